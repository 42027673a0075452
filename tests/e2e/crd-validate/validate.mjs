// node validate.mjs FILE.json: FILE holds a JSON list of Kubernetes objects
// (custom resources only). Prints one line per object; exits 1 if any is
// invalid. The schemas are generated from the cert-manager and Prometheus
// Operator CRDs: types, enums, patterns and required fields are checked,
// unknown fields are not (the CRDs do not forbid them).
import { readFileSync } from "node:fs";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = {
  "cert-manager.io/v1/Certificate": Certificate,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

let failed = false;
for (const object of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const key = `${object.apiVersion}/${object.kind}`;
  const Model = models[key];
  const name = `${key} ${object.metadata?.name}`;
  if (!Model) {
    console.log(`ERROR ${name}: no schema for this kind`);
    failed = true;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`OK ${name}`);
  } catch (error) {
    console.log(`ERROR ${name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
