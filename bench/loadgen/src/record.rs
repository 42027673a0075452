//! One measured value, as a tab-separated line:
//! `figure variant metric proxy cert rep value`.
//!
//! The load generator prints these on stdout; `compare.sh` appends them to
//! one file per run, and [`crate::report`] reads that file.

use std::fmt;

use anyhow::{bail, Context, Result};

/// Who a measurement is labelled with (the script passes these).
#[derive(Debug, Clone, clap::Args)]
pub struct Labels {
    /// The proxy under test: ours, haproxy, stunnel, or direct (no proxy).
    #[arg(long, default_value = "ours")]
    pub proxy: String,
    /// The certificate's key type: ecdsa or rsa.
    #[arg(long, default_value = "ecdsa")]
    pub cert: String,
    /// Which repetition this is (1, 2, 3, ...).
    #[arg(long, default_value_t = 1)]
    pub rep: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub figure: String,
    pub variant: String,
    pub metric: String,
    pub proxy: String,
    pub cert: String,
    pub rep: u32,
    pub value: f64,
}

impl Record {
    pub fn new(labels: &Labels, figure: &str, variant: &str, metric: &str, value: f64) -> Self {
        Self {
            figure: figure.into(),
            variant: variant.into(),
            metric: metric.into(),
            proxy: labels.proxy.clone(),
            cert: labels.cert.clone(),
            rep: labels.rep,
            value,
        }
    }

    /// Parses one line; `None` for blank lines and `#` comments.
    pub fn parse(line: &str) -> Result<Option<Record>> {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            return Ok(None);
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 7 {
            bail!("expected 7 tab-separated fields: {line:?}");
        }
        Ok(Some(Record {
            figure: fields[0].into(),
            variant: fields[1].into(),
            metric: fields[2].into(),
            proxy: fields[3].into(),
            cert: fields[4].into(),
            rep: fields[5]
                .parse()
                .with_context(|| format!("rep in {line:?}"))?,
            value: fields[6]
                .parse()
                .with_context(|| format!("value in {line:?}"))?,
        }))
    }

    pub fn parse_all(text: &str) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if let Some(record) =
                Record::parse(line).with_context(|| format!("line {}", number + 1))?
            {
                records.push(record);
            }
        }
        Ok(records)
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.figure,
            self.variant,
            self.metric,
            self.proxy,
            self.cert,
            self.rep,
            // Enough digits for any figure here, without float noise.
            (self.value * 1000.0).round() / 1000.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_printing_and_parsing() {
        let labels = Labels {
            proxy: "haproxy".into(),
            cert: "rsa".into(),
            rep: 2,
        };
        let record = Record::new(&labels, "implicit", "imap", "sessions_per_s", 2170.25);
        let parsed = Record::parse(&record.to_string()).unwrap().unwrap();
        assert_eq!(parsed, record);
        assert!(Record::parse("# comment").unwrap().is_none());
        assert!(Record::parse("a\tb").is_err());
    }
}
