// Validates prometheus-operator custom resources against the CRD schemas compiled into
// @kubernetes-models/prometheus-operator (generated from the operator's own CRDs).
//
//   node validate-crds.mjs < resources.json
//
// stdin: a JSON array of resources. stdout: a JSON array with one entry per resource,
// {kind, name, error}, where error is null when the resource is valid. A kind this script
// has no schema for is an error too, so nothing passes unchecked.
import { readFileSync } from "node:fs";

import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

const resources = JSON.parse(readFileSync(0, "utf8"));
const results = resources.map((resource) => {
  const key = `${resource.apiVersion}/${resource.kind}`;
  const name = resource.metadata?.name ?? null;
  const Model = MODELS[key];
  if (!Model) {
    return { kind: resource.kind, name, error: `no schema for ${key}` };
  }
  try {
    new Model(resource).validate();
    return { kind: resource.kind, name, error: null };
  } catch (e) {
    return { kind: resource.kind, name, error: String(e.message ?? e) };
  }
});
process.stdout.write(JSON.stringify(results));
