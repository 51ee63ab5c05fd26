//! GPU scheduling on the fake kwok nodes is real: the kube-scheduler places pods by
//! their nvidia.com/gpu requests.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use llmops_tests::{TestNamespace, client, eventually};

fn gpu_pod(name: &str, gpus: u32) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "containers": [{
                "name": "worker",
                "image": "llmops-worker:test",
                "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}
            }]
        }
    }))
    .expect("valid pod")
}

#[tokio::test]
async fn a_pod_asking_for_a_gpu_lands_on_a_gpu_node() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "gpu-scheduling").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..4 {
        pods.create(&PostParams::default(), &gpu_pod(&format!("gpu-{i}"), 1)).await?;
    }
    for i in 0..4 {
        let name = format!("gpu-{i}");
        let node = eventually(&format!("{name} to be scheduled"), Duration::from_secs(30), || async {
            Ok(pods.get(&name).await?.spec.and_then(|s| s.node_name))
        })
        .await?;
        assert!(node.starts_with("gpu-node-"), "{name} was scheduled onto {node}");
    }
    Ok(())
}

#[tokio::test]
async fn a_pod_asking_for_more_gpus_than_any_node_has_stays_pending() -> anyhow::Result<()> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "gpu-unschedulable").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.create(&PostParams::default(), &gpu_pod("too-big", 9)).await?;
    let message = eventually("the scheduler's verdict", Duration::from_secs(30), || async {
        let pod = pods.get("too-big").await?;
        let status = pod.status.unwrap_or_default();
        let scheduled = status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "PodScheduled");
        Ok(scheduled.filter(|c| c.status == "False").map(|c| (c.reason, c.message, status.phase)))
    })
    .await?;
    let (reason, message, phase) = message;
    assert_eq!(reason.as_deref(), Some("Unschedulable"));
    assert_eq!(phase.as_deref(), Some("Pending"));
    let message = message.unwrap_or_default();
    assert!(message.contains("Insufficient nvidia.com/gpu"), "{message}");
    assert!(pods.get("too-big").await?.spec.and_then(|s| s.node_name).is_none());
    Ok(())
}
