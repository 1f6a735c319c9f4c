// Validates prometheus-operator objects (ServiceMonitor, PrometheusRule...) against the schemas
// @kubernetes-models/prometheus-operator generates from the operator's CRDs. Reads a JSON list
// of objects on stdin; prints one JSON line per object: {"kind", "name", "error"} (error null
// when valid). Used by tests/test_chart.py.
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
for (const doc of JSON.parse(Buffer.concat(chunks).toString("utf8"))) {
  let error = null;
  const Model = doc.apiVersion === "monitoring.coreos.com/v1" ? v1[doc.kind] : undefined;
  if (!Model) {
    error = `no schema for ${doc.apiVersion} ${doc.kind}`;
  } else {
    try {
      new Model(doc).validate();
    } catch (e) {
      error = String(e.message || e);
    }
  }
  console.log(JSON.stringify({ kind: doc.kind, name: doc.metadata?.name ?? null, error }));
}
