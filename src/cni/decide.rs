//! Whether a pod is enrolled, as Istio's ambient mode and Kmesh decide it:
//! the pod's `istio.io/dataplane-mode` label, else its namespace's; pods on
//! the host network, pods with a sidecar and waypoints are special.

use std::collections::BTreeMap;

use serde::Deserialize;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const MODE_KMESH: &str = "kmesh";
pub const MODE_NONE: &str = "none";
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
pub const SIDECAR_CONTAINER: &str = "istio-proxy";
pub const WAYPOINT_LABEL: &str = "gateway.istio.io/managed";
pub const WAYPOINT_VALUE: &str = "istio.io-mesh-controller";

/// What the decision needs of a pod and its namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
    /// Names of its containers and init containers.
    pub containers: Vec<String>,
    pub namespace_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Enroll {
        waypoint: bool,
    },
    /// Left alone, and why (logged by the plugin).
    Skip(String),
}

/// The static rule of the plugin config, for nodes without an API server
/// (`"enroll": {"all": true}` or `{"namespaces": [...]}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRule {
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

impl StaticRule {
    pub fn decide(&self, namespace: Option<&str>) -> Decision {
        if self.all {
            return Decision::Enroll { waypoint: false };
        }
        match namespace {
            Some(ns) if self.namespaces.iter().any(|n| n == ns) => {
                Decision::Enroll { waypoint: false }
            }
            Some(ns) => Decision::Skip(format!("namespace {ns} is not in the static rule")),
            None => Decision::Skip("no K8S_POD_NAMESPACE and the static rule is not all".into()),
        }
    }
}

fn selects(labels: &BTreeMap<String, String>) -> Option<bool> {
    match labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some(v) if v.eq_ignore_ascii_case(MODE_KMESH) => Some(true),
        // "none", or another data plane's mode (e.g. "ambient"): not ours.
        Some(_) => Some(false),
        None => None,
    }
}

pub fn decide(p: &PodFacts) -> Decision {
    if p.host_network {
        return Decision::Skip("hostNetwork pod: its netns is the node's".into());
    }
    if p.annotations.contains_key(SIDECAR_STATUS)
        || p.containers.iter().any(|c| c == SIDECAR_CONTAINER)
    {
        return Decision::Skip("pod has an Istio sidecar".into());
    }
    let ns = selects(&p.namespace_labels);
    if p.labels.get(WAYPOINT_LABEL).map(String::as_str) == Some(WAYPOINT_VALUE) {
        // Istio labels its waypoints dataplane-mode=none so that a node
        // proxy does not capture them; here they are enrolled with the
        // waypoint flag instead, which keeps their own connections from
        // being sent to a waypoint (a loop) while still redirecting them.
        return match selects(&p.labels).filter(|s| *s).or(ns) {
            Some(true) => Decision::Enroll { waypoint: true },
            _ => Decision::Skip("waypoint in a namespace not in the mesh".into()),
        };
    }
    match selects(&p.labels) {
        Some(true) => Decision::Enroll { waypoint: false },
        Some(false) => Decision::Skip(format!(
            "pod label {DATAPLANE_MODE}={}",
            p.labels[DATAPLANE_MODE]
        )),
        None => match ns {
            Some(true) => Decision::Enroll { waypoint: false },
            Some(false) => Decision::Skip(format!(
                "namespace label {DATAPLANE_MODE}={}",
                p.namespace_labels[DATAPLANE_MODE]
            )),
            None => Decision::Skip(format!("neither pod nor namespace has {DATAPLANE_MODE}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pod_label_wins_over_namespace() {
        let mut p = PodFacts {
            labels: map(&[(DATAPLANE_MODE, "none")]),
            namespace_labels: map(&[(DATAPLANE_MODE, "kmesh")]),
            ..Default::default()
        };
        assert!(matches!(decide(&p), Decision::Skip(_)));
        p.labels.clear();
        assert_eq!(decide(&p), Decision::Enroll { waypoint: false });
        p.namespace_labels.clear();
        assert!(matches!(decide(&p), Decision::Skip(_)));
        p.labels = map(&[(DATAPLANE_MODE, "Kmesh")]);
        assert_eq!(decide(&p), Decision::Enroll { waypoint: false });
    }

    #[test]
    fn special_pods() {
        let ns = map(&[(DATAPLANE_MODE, "kmesh")]);
        let host = PodFacts {
            host_network: true,
            namespace_labels: ns.clone(),
            ..Default::default()
        };
        assert!(matches!(decide(&host), Decision::Skip(s) if s.contains("hostNetwork")));
        let sidecar = PodFacts {
            containers: vec!["app".into(), "istio-proxy".into()],
            namespace_labels: ns.clone(),
            ..Default::default()
        };
        assert!(matches!(decide(&sidecar), Decision::Skip(s) if s.contains("sidecar")));
        let waypoint = PodFacts {
            labels: map(&[(WAYPOINT_LABEL, WAYPOINT_VALUE), (DATAPLANE_MODE, "none")]),
            namespace_labels: ns,
            ..Default::default()
        };
        assert_eq!(decide(&waypoint), Decision::Enroll { waypoint: true });
    }

    #[test]
    fn static_rule() {
        let r = StaticRule {
            all: false,
            namespaces: vec!["a".into()],
        };
        assert_eq!(r.decide(Some("a")), Decision::Enroll { waypoint: false });
        assert!(matches!(r.decide(Some("b")), Decision::Skip(_)));
        assert!(matches!(r.decide(None), Decision::Skip(_)));
    }
}
