//! Start-up: what a crash of runtimed left half made. A sandbox or container is recorded
//! only once it is complete, so a bundle, a pinned network namespace or a runtime container
//! without a record is the remains of an interrupted RunPodSandbox or CreateContainer; it is
//! removed as a failed request would have removed it.

use super::RuntimeService;
use crate::cni::{Attachment, Network};
use crate::oci::Runtime;
use std::collections::BTreeSet;
use std::path::Path;

impl RuntimeService {
    /// Removes every sandbox and container that has files but no record.
    pub async fn remove_unrecorded(&self) {
        let sandboxes: BTreeSet<String> = self.sandboxes.read().await.keys().cloned().collect();
        let containers: BTreeSet<String> = self.containers.read().await.keys().cloned().collect();
        let state = self.config.state.clone();
        let orphans = |dir: &str, known: &BTreeSet<String>| -> Vec<String> {
            let entries = std::fs::read_dir(state.join(dir))
                .into_iter()
                .flatten()
                .flatten();
            let ids = entries.filter_map(|e| e.file_name().to_str().map(str::to_string));
            ids.filter(|id| !known.contains(id)).collect()
        };
        let mut stale_sandboxes: BTreeSet<String> =
            orphans("sandboxes", &sandboxes).into_iter().collect();
        stale_sandboxes.extend(orphans("netns", &sandboxes));
        stale_sandboxes.extend(orphans("userns", &sandboxes));
        for id in stale_sandboxes {
            tracing::info!(sandbox = %id, "removing an unfinished pod sandbox");
            self.remove_unrecorded_sandbox(&id).await;
        }
        for id in orphans("containers", &containers) {
            tracing::info!(container = %id, "removing an unfinished container");
            let bundle = crate::container::bundle(&self.config.state, &id);
            let runtimes = self.runtimes();
            let removed =
                plumbing::blocking(move || remove_everywhere(&runtimes, &id, &bundle).map(|()| id))
                    .await;
            if let Ok(id) = removed {
                self.drop_snapshot(&id).await;
            }
        }
    }

    async fn remove_unrecorded_sandbox(&self, id: &str) {
        let paths = self.paths(id);
        let netns = self.config.state.join("netns").join(id);
        let userns = self.config.state.join("userns").join(id);
        let network = self.network().ok();
        let bin_dir = self.config.cni.bin_dir.clone();
        let runtimes = self.runtimes();
        let id_owned = id.to_string();
        let result = plumbing::blocking(move || {
            if netns.exists() {
                let pod = Attachment {
                    container_id: id_owned.clone(),
                    netns: netns.clone(),
                    ifname: "eth0".into(),
                    ..Attachment::default()
                };
                if let Some(Err(e)) = network.map(|n| n.del(&pod, None)) {
                    tracing::warn!(error = %e, "CNI DEL of an unfinished pod sandbox");
                }
                let loopback = Network::new(crate::cni::invoke::loopback(), &bin_dir);
                let _ = loopback.del(
                    &Attachment {
                        ifname: "lo".into(),
                        ..pod
                    },
                    None,
                );
                crate::netns::remove(&netns).map_err(crate::error::Error::io("remove", &netns))?;
            }
            crate::netns::remove(&userns).map_err(crate::error::Error::io("remove", &userns))?;
            remove_everywhere(&runtimes, &id_owned, &paths.bundle)?;
            crate::sandbox::remove_dir(&paths.files)
        })
        .await;
        match result {
            Ok(()) => self.drop_snapshot(id).await,
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "removing an unfinished pod sandbox")
            }
        }
    }

    async fn drop_snapshot(&self, id: &str) {
        if let Err(e) = self.images.remove(id).await {
            tracing::warn!(id, error = %e, "removing the snapshot of an unfinished sandbox or container");
        }
    }

    /// Every configured runtime handler that can be found.
    fn runtimes(&self) -> Vec<Runtime> {
        let names = self.config.runtimes.keys();
        names.filter_map(|name| self.runtime(name).ok()).collect()
    }
}

/// Deletes `id` from every runtime that knows it, and its bundle with what is mounted in it.
fn remove_everywhere(
    runtimes: &[Runtime],
    id: &str,
    bundle: &Path,
) -> Result<(), crate::error::Error> {
    for runtime in runtimes {
        if let Err(e) = crate::sandbox::delete_state(runtime, id) {
            tracing::debug!(runtime = %runtime.name, error = %e, "deleting runtime state");
        }
    }
    crate::sandbox::remove_bundle(bundle)
}
