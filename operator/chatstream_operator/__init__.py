"""chatstream-operator: renders ChatStream custom resources into KubeRay RayServices.

Read in this order: `spec` (defaults and the checks the CRD schema cannot express), `schema`
(the CRD's own schema and KubeRay's naming rules, checked again), `render` (spec -> desired
RayService, pure) with `pods` (the pod template surface), `drain` (drain bounds), `network`
and `disruption` (the NetworkPolicy and PodDisruptionBudget), `patching` (minimal merge patches),
`status` (RayService status -> ChatStream status, pure), `kube` (the few API calls), `options`
(the flags, handed to the handlers as kopf's memo), `handlers` (thin kopf layer), `__main__`
(the `chatstream-operator` command).
"""

GROUP = "chatstream.dev"
VERSION = "v1alpha1"
PLURAL = "chatstreams"
KIND = "ChatStream"

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayservices"

OPERATOR_NAME = "chatstream-operator"

# Labels on everything the operator renders; the RayService watch filters on MANAGED_BY_LABEL and
# finds its ChatStream through NAME_LABEL.
NAME_LABEL = "chatstream.dev/name"
COMPONENT_LABEL = "chatstream.dev/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
