//! The pod's and its namespace's labels from the Kubernetes API (kube-rs),
//! with the kubeconfig the plugin config names or the in-cluster config.

use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};

use super::decide::PodFacts;

/// Reads what `decide` needs of pod `namespace/name`.
pub async fn pod_facts(
    kubeconfig: Option<&Path>,
    namespace: &str,
    name: &str,
) -> Result<PodFacts, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => Config::incluster().map_err(|e| format!("in-cluster config: {e}"))?,
    };
    let client = Client::try_from(config).map_err(|e| format!("API client: {e}"))?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| format!("GET pod {namespace}/{name}: {e}"))?;
    let ns = Api::<Namespace>::all(client)
        .get(namespace)
        .await
        .map_err(|e| format!("GET namespace {namespace}: {e}"))?;
    let spec = pod.spec.unwrap_or_default();
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.clone())
        .collect();
    Ok(PodFacts {
        labels: pod.metadata.labels.unwrap_or_default(),
        annotations: pod.metadata.annotations.unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
        containers,
        namespace_labels: ns.metadata.labels.unwrap_or_default(),
    })
}
