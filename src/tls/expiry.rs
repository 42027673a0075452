//! Certificate validity over time: how a leaf's Not Before and Not After
//! look at a given moment, and the warnings logged at load, at each reload
//! and daily for certificates that are expired, expire soon or are not
//! valid yet. An expired certificate is still served: refusing would take
//! mail down.

use std::time::Duration;

use tracing::{error, warn};

use super::certs::LoadedCertificate;
use crate::time::format_unix_time;

/// A certificate that expires within this many days is warned about at load
/// and daily.
pub(crate) const EXPIRY_WARNING_DAYS: i64 = 14;
/// How often certificates near or past expiry are warned about again.
pub(crate) const EXPIRY_WARNING_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// A leaf's validity at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Valid for more than `EXPIRY_WARNING_DAYS` (14) days.
    Valid { days_left: i64 },
    /// Valid, but for `EXPIRY_WARNING_DAYS` (14) days or fewer.
    ExpiresSoon { days_left: i64 },
    /// Not After has passed.
    Expired { days_ago: i64 },
    /// Not Before is still to come.
    NotYetValid { days_until: i64 },
}

impl Expiry {
    pub(crate) fn at(not_before: i64, not_after: i64, now: i64) -> Expiry {
        const DAY: i64 = 86_400;
        if now > not_after {
            Expiry::Expired {
                days_ago: (now - not_after) / DAY,
            }
        } else if now < not_before {
            Expiry::NotYetValid {
                days_until: (not_before - now) / DAY,
            }
        } else {
            let days_left = (not_after - now) / DAY;
            if not_after - now <= EXPIRY_WARNING_DAYS * DAY {
                Expiry::ExpiresSoon { days_left }
            } else {
                Expiry::Valid { days_left }
            }
        }
    }
}

impl LoadedCertificate {
    /// How the leaf's validity period looks at `now` (a Unix time).
    pub fn expiry(&self, now: i64) -> Expiry {
        Expiry::at(self.not_before, self.not_after, now)
    }
}

/// Logs a loud warning for a certificate that is expired, expires within
/// [`EXPIRY_WARNING_DAYS`] days, or is not valid yet. An expired
/// certificate is still served: refusing would take mail down.
pub(crate) fn warn_about_expiry(label: &str, certificate: &LoadedCertificate, now: i64) {
    let not_after = format_unix_time(certificate.not_after);
    match certificate.expiry(now) {
        Expiry::Valid { .. } => {}
        Expiry::ExpiresSoon { days_left } => warn!(
            certificate = %label,
            %not_after,
            days_left,
            source = %certificate.source(),
            "certificate expires soon: renew it (the proxy picks up the new files by itself)"
        ),
        Expiry::Expired { days_ago } => error!(
            certificate = %label,
            %not_after,
            days_ago,
            source = %certificate.source(),
            "CERTIFICATE EXPIRED: still serving it so mail keeps flowing, but clients that verify will refuse it; renew it now"
        ),
        Expiry::NotYetValid { days_until } => warn!(
            certificate = %label,
            not_before = %format_unix_time(certificate.not_before),
            days_until,
            source = %certificate.source(),
            "certificate is not valid yet (check the clock); serving it anyway"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_classification() {
        let day = 86_400;
        let (start, end) = (0, 100 * day);
        assert_eq!(
            Expiry::at(start, end, 10 * day),
            Expiry::Valid { days_left: 90 }
        );
        assert_eq!(
            Expiry::at(start, end, end - 14 * day),
            Expiry::ExpiresSoon { days_left: 14 }
        );
        assert_eq!(
            Expiry::at(start, end, end - 1),
            Expiry::ExpiresSoon { days_left: 0 }
        );
        assert_eq!(
            Expiry::at(start, end, end + 3 * day),
            Expiry::Expired { days_ago: 3 }
        );
        assert_eq!(
            Expiry::at(10 * day, end, 0),
            Expiry::NotYetValid { days_until: 10 }
        );
    }
}
