// Validates the custom resources of deploy/k8s against the JSON schemas generated from the
// real CRDs, as shipped by the npm packages @kubernetes-models/prometheus-operator
// (ServiceMonitor) and @kubernetes-models/keda (ScaledObject): types, required fields, enums
// and patterns. Like the API server, those schemas let unknown fields through; check.py's strict
// schema catches those. Input: JSON lines {"file", "doc"} on stdin (check.py crd-docs).
import { createInterface } from "node:readline";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
};
let failures = 0;
let checked = 0;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const { file, doc } = JSON.parse(line);
  const Model = models[`${doc.apiVersion}/${doc.kind}`];
  if (!Model) {
    console.log(`  FAIL: ${file}: no CRD schema for ${doc.apiVersion} ${doc.kind}`);
    failures++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`  ${file}: ${doc.kind} ${doc.metadata.name} valid against the ${doc.apiVersion} CRD schema`);
  } catch (error) {
    console.log(`  FAIL: ${file}: ${doc.kind} ${doc.metadata?.name}: ${error.message}`);
    failures++;
  }
  checked++;
}
if (checked < 2) {
  console.log(`  FAIL: expected a ServiceMonitor and a ScaledObject, validated ${checked}`);
  failures++;
}
process.exit(failures ? 1 : 0);
