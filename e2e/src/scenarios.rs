//! The end-to-end scenarios. Each takes an [`Environment`], acts as the orchestrator would, checks
//! what the API and the data say, and takes down what it set up whether it passed or not.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tessera_api::v1alpha1::{AttachmentState, ClaimPhase, VirtualVolume};
use tonic::Code;

use crate::cluster::{self, Poll, wait_for};
use crate::co::{Access, Attached, Orchestrator, PUBLISH_GENERATION, Provisioned, VolumeRequest};
use crate::ensure;
use crate::env::Environment;
use crate::error::{E2eError, Result};
use crate::io::{VolumeIo, first_difference, pattern};

type ScenarioFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// One named scenario.
pub struct Scenario {
    /// What the scenario proves, as a name.
    pub name: &'static str,
    pub run: for<'a> fn(&'a Environment) -> ScenarioFuture<'a>,
}

/// Every scenario, in the order they are meant to run.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "data_follows_the_borrower_to_a_remote_node_and_survives_expansion",
            run: |env| Box::pin(data_follows_the_borrower_to_a_remote_node(env)),
        },
        Scenario {
            name: "claim_reclaims_unused_extents_of_a_detached_low_priority_volume",
            run: |env| {
                Box::pin(claim_reclaims_unused_extents_of_a_detached_low_priority_volume(env))
            },
        },
        Scenario {
            name: "claim_larger_than_the_pool_is_rejected_and_allocates_nothing",
            run: |env| Box::pin(claim_larger_than_the_pool_is_rejected_and_allocates_nothing(env)),
        },
        Scenario {
            name: "second_single_writer_publish_is_refused_until_the_first_unpublishes",
            run: |env| Box::pin(second_single_writer_publish_is_refused(env)),
        },
        Scenario {
            name: "a_filesystem_keeps_its_files_across_nodes_and_grows_online",
            run: |env| {
                Box::pin(a_filesystem_keeps_its_files_across_nodes_and_grows_online(
                    env,
                ))
            },
        },
        Scenario {
            name: "a_new_volume_never_reads_a_deleted_volumes_data",
            run: |env| Box::pin(a_new_volume_never_reads_a_deleted_volumes_data(env)),
        },
    ]
}

/// The outcome of one scenario.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub result: Result<()>,
    pub elapsed: Duration,
}

/// Runs `scenarios` one after the other (they share the pool, so they must not overlap) and
/// calls `report` after each.
pub async fn run(
    env: &Environment,
    scenarios: &[Scenario],
    mut report: impl FnMut(&Outcome),
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for s in scenarios {
        let start = Instant::now();
        // A panic is one scenario's failure, not the end of the run (the cluster still gets
        // stopped and the other scenarios still run).
        let result = match AssertUnwindSafe((s.run)(env)).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => Err(E2eError::Check(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            ))),
        };
        let outcome = Outcome {
            name: s.name,
            result,
            elapsed: start.elapsed(),
        };
        report(&outcome);
        outcomes.push(outcome);
    }
    outcomes
}

/// Runs `body` with a fresh orchestrator and always cleans up after it; a cleanup failure is
/// reported after the body's own error.
async fn with_orchestrator<'e, F>(env: &'e Environment, body: F) -> Result<()>
where
    F: AsyncFnOnce(&mut Orchestrator<'e>) -> Result<()>,
{
    let mut co = Orchestrator::new(env);
    let result = body(&mut co).await;
    let cleanup = co.cleanup().await;
    match (result, cleanup) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(c)) => Err(c),
        (Err(e), Err(c)) => Err(E2eError::Many(vec![e, c])),
    }
}

/// Seed 001 §4.3–§4.6 and acceptance scenarios 4–6, 11: allocate → mount on node 1 → write →
/// unmount → mount on node 2, which reaches the extents on other nodes through their agents
/// (extent servers) → the same bytes → expand → delete, and the extents are back in the pool.
pub async fn data_follows_the_borrower_to_a_remote_node(env: &Environment) -> Result<()> {
    with_orchestrator(env, async |co: &mut Orchestrator<'_>| {
        cluster::ensure_priority_classes(env).await?;
        let extent = cluster::extent_size(env).await?;
        let (unallocated_before, _) = cluster::wait_pool_settled(env).await?;
        let node1 = env.nodes[0].name.clone();
        let size = 4 * extent;

        // Allocate (seed 001 S5): CreateVolume → a Bound claim and a fully mapped volume.
        let request = VolumeRequest::block("e2e-move", size, "high").on_node(&node1);
        let vol = co.create_volume(&request).await?;
        // csi-provisioner retries CreateVolume with the same name after a timeout: same volume.
        let again = co.create_volume(&request).await?;
        ensure!(
            again.id == vol.id,
            "CreateVolume retried with the same name returned {} instead of {}",
            again.id,
            vol.id
        );
        ensure!(
            vol.capacity_bytes >= size as i64,
            "CreateVolume returned {} bytes for a {size}-byte request",
            vol.capacity_bytes
        );
        expect_bound_claim(env, &vol).await?;
        cluster::wait_pool_unallocated(env, unallocated_before - size as i64, "after CreateVolume")
            .await?;
        let vv = cluster::existing_volume(env, &vol.id).await?;
        ensure!(
            cluster::range_mapped(&vv, 0, size as i64),
            "volume {} is not fully mapped after CreateVolume: {:?}",
            vol.id,
            vv.status.as_ref().and_then(|s| s.mapping.as_ref())
        );

        // Mount on node 1 (S4): the borrower is recorded, the node reports the attachment.
        let att1 = co.attach(&vol, &node1).await?;
        expect_published_generation(&att1, &vv)?;
        wait_attached(env, &vol.id, &node1).await?;

        // Write a pattern spanning two extent boundaries, and the volume's last MiB.
        let ranges = [(extent / 2, 2 * extent), (size - (1 << 20), 1 << 20)];
        let io = co.open_io(&att1).await?;
        ensure!(
            io.size() >= size,
            "{} shows {} bytes, expected at least {size}",
            io.describe(),
            io.size()
        );
        for &(offset, len) in &ranges {
            write_and_verify(&io, 11, offset, len).await?;
        }
        io.close().await;

        // Unmount (S3): nothing of the path stays behind on node 1.
        co.detach(&att1).await?;
        wait_detached(env, &vol.id, &node1).await?;
        expect_no_export(co, &vol.id, &node1)?;

        // Mount on a node that does not hold every extent: some I/O now goes to another
        // node's extent server (seed 001 [0035]–[0039]).
        let holders = cluster::holder_nodes(env, &vv).await?;
        let node2 = env
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| *n != node1 && holders.keys().any(|h| h != n))
            .ok_or_else(|| {
                E2eError::Check(format!(
                    "every other node holds all extents of {} ({holders:?}); cannot test remote access",
                    vol.id
                ))
            })?;
        let att2 = co.attach(&vol, &node2).await?;
        wait_attached(env, &vol.id, &node2).await?;
        let io = co.open_io(&att2).await?;
        for &(offset, len) in &ranges {
            verify(&io, 11, offset, len).await?;
        }
        let through_device = io.is_device();
        io.close().await;
        if through_device {
            // The NBD export of the staged volume shows the same bytes as the kernel device.
            let (socket, export) = co.nbd_export(&vol.id, &node2)?;
            let nbd = VolumeIo::open_nbd(&socket, &export).await?;
            for &(offset, len) in &ranges {
                verify(&nbd, 11, offset, len).await?;
            }
            nbd.close().await;
        }

        // Expand while published on node 2: new extents at the end, old data untouched, the
        // new range reads as zeros and takes writes.
        let new_size = size + 2 * extent;
        let (capacity, _) = co.expand(&vol, new_size, Some(&att2)).await?;
        ensure!(
            capacity >= new_size as i64,
            "ControllerExpandVolume reported {capacity} bytes for {new_size}"
        );
        wait_for(
            &format!("{} mapped to {new_size} bytes", vol.id),
            env.timeout,
            || async {
                let vv = cluster::existing_volume(env, &vol.id).await?;
                Ok(
                    if vv.spec.size_bytes >= new_size as i64
                        && cluster::range_mapped(&vv, 0, new_size as i64)
                    {
                        Poll::Ready(())
                    } else {
                        Poll::Pending(format!(
                            "spec.sizeBytes {} mapped {}",
                            vv.spec.size_bytes,
                            cluster::mapped_bytes(&vv)
                        ))
                    },
                )
            },
        )
        .await?;
        cluster::wait_pool_unallocated(
            env,
            unallocated_before - new_size as i64,
            "after ControllerExpandVolume",
        )
        .await?;
        let io = co.open_io(&att2).await?;
        ensure!(
            io.size() >= new_size,
            "after NodeExpandVolume {} shows {} bytes, expected {new_size}",
            io.describe(),
            io.size()
        );
        for &(offset, len) in &ranges {
            verify(&io, 11, offset, len).await?;
        }
        verify_zeros(&io, size, new_size - size, "the expanded range").await?;
        write_and_verify(&io, 12, size, new_size - size).await?;
        verify(&io, 11, ranges[0].0, ranges[0].1).await?;
        io.close().await;
        co.detach(&att2).await?;
        wait_detached(env, &vol.id, &node2).await?;

        // Delete: claim and volume gone, every extent back in the pool.
        let (claim_ns, claim_name) = vol.claim()?;
        co.delete_volume(&vol.id).await?;
        wait_gone(env, &vol.id, &claim_ns, &claim_name).await?;
        cluster::wait_pool_unallocated(env, unallocated_before, "after DeleteVolume").await
    })
    .await
}

/// Seed 000 [0045]–[0058], Fig. 7: a claim larger than the free space is admitted because a
/// detached low-priority volume holds allocated-but-unused extents; those are released (from
/// the end of the victim) and the victim's data stays.
pub async fn claim_reclaims_unused_extents_of_a_detached_low_priority_volume(
    env: &Environment,
) -> Result<()> {
    with_orchestrator(env, async |co: &mut Orchestrator<'_>| {
        cluster::ensure_priority_classes(env).await?;
        let extent = cluster::extent_size(env).await?;
        let (u0, _) = cluster::wait_pool_settled(env).await?;
        let free_extents = u64::try_from(u0).unwrap_or(0) / extent;
        ensure!(
            free_extents >= 12,
            "the pool has {free_extents} free extents; the reclaim scenario needs at least 12"
        );
        let node1 = env.nodes[0].name.clone();
        let node2 = env.nodes[1].name.clone();
        let filler_node = env.nodes.last().map(|n| n.name.clone()).unwrap_or_default();

        // The victim: low priority, two extents written, the rest allocated but unused.
        let victim_extents = (free_extents / 4).clamp(4, 64);
        let written = 2 * extent;
        let victim = co
            .create_volume(
                &VolumeRequest::block("e2e-victim", victim_extents * extent, "low").on_node(&node1),
            )
            .await?;
        let att = co.attach(&victim, &node1).await?;
        let io = co.open_io(&att).await?;
        write_and_verify(&io, 21, 0, written).await?;
        io.close().await;
        // The node's usage report is what tells the operator which extents hold data.
        wait_for(
            &format!(
                "usage report of {} showing {written} bytes in use",
                victim.id
            ),
            env.timeout,
            || async {
                let vv = cluster::existing_volume(env, &victim.id).await?;
                let in_use = vv
                    .status
                    .as_ref()
                    .and_then(|s| s.usage.as_ref())
                    .map(|u| u.in_use_bytes);
                Ok(if in_use == Some(written as i64) {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("status.usage.inUseBytes {in_use:?}"))
                })
            },
        )
        .await?;
        co.detach(&att).await?;
        wait_detached(env, &victim.id, &node1).await?;
        let u1 = u0 - (victim_extents * extent) as i64;
        cluster::wait_pool_unallocated(env, u1, "after the victim was allocated").await?;

        // The filler takes all but two free extents and stays published: a volume a node uses
        // is never a victim, so only the victim can give space back.
        let filler_extents = u64::try_from(u1).unwrap_or(0) / extent - 2;
        let filler = co
            .create_volume(&VolumeRequest::block(
                "e2e-filler",
                filler_extents * extent,
                "high",
            ))
            .await?;
        co.controller_publish(&filler, &filler_node).await?;
        cluster::wait_pool_unallocated(env, 2 * extent as i64, "after the filler").await?;

        // The claim needs `need` extents more than the pool has free.
        let need = (victim_extents - 2).min(4);
        let claim_size = (2 + need) * extent;
        let claimer = co
            .create_volume(&VolumeRequest::block("e2e-reclaimer", claim_size, "high"))
            .await?;
        expect_bound_claim(env, &claimer).await?;
        let claimed = cluster::existing_volume(env, &claimer.id).await?;
        ensure!(
            cluster::range_mapped(&claimed, 0, claim_size as i64),
            "the reclaiming claim's volume {} is not fully mapped",
            claimer.id
        );

        // The victim shrank by at least `need` extents, and only unused ones went.
        let vv = cluster::existing_volume(env, &victim.id).await?;
        let mapped = cluster::mapped_bytes(&vv);
        ensure!(
            mapped <= ((victim_extents - need) * extent) as i64,
            "victim {} still maps {mapped} bytes of {}; expected at most {} after reclaim",
            victim.id,
            victim_extents * extent,
            (victim_extents - need) * extent
        );
        ensure!(
            cluster::range_mapped(&vv, 0, written as i64),
            "reclaim released written extents of {}: {:?}",
            victim.id,
            vv.status.as_ref().and_then(|s| s.mapping.as_ref())
        );

        // The victim's data is intact, read from another node.
        let att = co.attach(&victim, &node2).await?;
        let io = co.open_io(&att).await?;
        verify(&io, 21, 0, written).await?;
        io.close().await;
        co.detach(&att).await?;

        // Everything goes back to the pool.
        co.delete_volume(&claimer.id).await?;
        co.controller_unpublish(&filler.id, &filler_node).await?;
        co.delete_volume(&filler.id).await?;
        co.delete_volume(&victim.id).await?;
        cluster::wait_pool_unallocated(env, u0, "after deleting the reclaim scenario's volumes")
            .await
    })
    .await
}

/// Seed 000 [0045]–[0046]: a claim no reclaim could satisfy is rejected, nothing is allocated
/// or reclaimed, and CreateVolume says so with RESOURCE_EXHAUSTED and the operator's reason. The
/// controller deletes the rejected claim (so the provisioner's retry asks afresh), and the retry
/// is rejected the same way.
pub async fn claim_larger_than_the_pool_is_rejected_and_allocates_nothing(
    env: &Environment,
) -> Result<()> {
    with_orchestrator(env, async |co: &mut Orchestrator<'_>| {
        cluster::ensure_priority_classes(env).await?;
        let extent = cluster::extent_size(env).await?;
        let (u0, total) = cluster::wait_pool_settled(env).await?;
        let request = VolumeRequest::block(
            "e2e-too-big",
            u64::try_from(total).unwrap_or(0) + extent,
            "high",
        );
        let first = co.create_volume(&request).await;
        expect_rejection(&request, first)?;
        // The provisioner retries with the same name; ABORTED means "still cleaning up the
        // previous attempt, try again", as the provisioner would.
        let retry = wait_for(
            "a retried CreateVolume that is not ABORTED",
            env.timeout,
            || async {
                let r = co_retry(env, &request).await;
                Ok(match &r {
                    Err(e) if e.csi_status().map(|s| s.code()) == Some(Code::Aborted) => {
                        Poll::Pending(e.to_string())
                    }
                    _ => Poll::Ready(r),
                })
            },
        )
        .await?;
        expect_rejection(&request, retry)?;

        // Nothing stays: no claim, no volume, not one extent allocated.
        wait_for(
            &format!("the rejected claim of {} to be gone", request.csi_name),
            env.timeout,
            || async {
                let claims = cluster::claims_for_csi_name(env, &request.csi_name).await?;
                Ok(if claims.is_empty() {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!(
                        "{:?}",
                        claims
                            .iter()
                            .map(|c| (c.metadata.name.clone(), c.status.clone()))
                            .collect::<Vec<_>>()
                    ))
                })
            },
        )
        .await?;
        let volumes = cluster::volumes_for_claim(env, &env.namespace, &request.csi_name).await?;
        ensure!(
            volumes.is_empty(),
            "the rejected claim left volumes behind: {volumes:?}"
        );
        let (after, _) = cluster::wait_pool_settled(env).await?;
        ensure!(
            after == u0,
            "unallocated bytes moved from {u0} to {after} for a rejected claim"
        );
        Ok(())
    })
    .await
}

/// One CreateVolume outside the scenario's orchestrator (a retry records nothing either way).
async fn co_retry(env: &Environment, request: &VolumeRequest) -> Result<Provisioned> {
    let mut co = Orchestrator::new(env);
    let result = co.create_volume(request).await;
    if result.is_ok() {
        co.cleanup().await?;
    }
    result
}

/// RESOURCE_EXHAUSTED whose message names the operator's reason: a claim larger than the
/// pool's total fails admission (U + F + L < N), `InsufficientCapacity`.
fn expect_rejection(request: &VolumeRequest, result: Result<Provisioned>) -> Result<()> {
    let status = match result {
        Ok(vol) => {
            return Err(E2eError::Check(format!(
                "CreateVolume of {} bytes (more than the pool's total) succeeded with {}",
                request.size_bytes, vol.id
            )));
        }
        Err(e) => e.csi_status().cloned().ok_or(e)?,
    };
    ensure!(
        status.code() == Code::ResourceExhausted,
        "CreateVolume failed with {:?} ({}), expected RESOURCE_EXHAUSTED",
        status.code(),
        status.message()
    );
    ensure!(
        status.message().contains("InsufficientCapacity"),
        "CreateVolume's RESOURCE_EXHAUSTED message {:?} does not carry the claim's reason \
         (InsufficientCapacity)",
        status.message()
    );
    Ok(())
}

/// Seed 001 [0028] and acceptance scenario 7: one borrower at a time. A second node's
/// ControllerPublish is refused and it cannot stage the volume; once the first node unpublishes,
/// the second gets it.
pub async fn second_single_writer_publish_is_refused(env: &Environment) -> Result<()> {
    with_orchestrator(env, async |co: &mut Orchestrator<'_>| {
        cluster::ensure_priority_classes(env).await?;
        let extent = cluster::extent_size(env).await?;
        let node1 = env.nodes[0].name.clone();
        let node2 = env.nodes[1].name.clone();
        let vol = co
            .create_volume(&VolumeRequest::block("e2e-exclusive", 2 * extent, "high"))
            .await?;

        let ctx1 = co.controller_publish(&vol, &node1).await?;
        let refused = co.controller_publish(&vol, &node2).await;
        expect_code(
            refused.map(|_| ()),
            Code::FailedPrecondition,
            "second ControllerPublish",
        )?;
        let vv = cluster::existing_volume(env, &vol.id).await?;
        ensure!(
            vv.spec.access_node.as_deref() == Some(node1.as_str()),
            "after the refused publish the borrower is {:?}, expected {node1}",
            vv.spec.access_node
        );
        // The node agent enforces it too: a node that is not the borrower cannot stage.
        let staged = co.node_stage(&vol, &node2, &ctx1).await;
        expect_code(
            staged.map(|_| ()),
            Code::FailedPrecondition,
            "NodeStage on the non-borrower",
        )?;

        co.controller_unpublish(&vol.id, &node1).await?;
        let att = co.attach(&vol, &node2).await?;
        let vv = cluster::existing_volume(env, &vol.id).await?;
        ensure!(
            vv.spec.access_node.as_deref() == Some(node2.as_str()),
            "after moving, the borrower is {:?}, expected {node2}",
            vv.spec.access_node
        );
        let io = co.open_io(&att).await?;
        write_and_verify(&io, 41, 0, 1 << 20).await?;
        io.close().await;
        co.detach(&att).await?;
        co.delete_volume(&vol.id).await
    })
    .await
}

/// The kubelet path for `volumeMode: Filesystem` (issue 5, node): NodeStage makes ext4 on the
/// blank device and mounts it, NodePublish bind mounts it into the pod; a file written on node 1
/// is there on node 2, which must not format the device again; ControllerExpandVolume asks for
/// node expansion and NodeExpandVolume grows the filesystem while it is mounted. Needs a kernel
/// frontend (root and fuse-loop); skipped elsewhere.
pub async fn a_filesystem_keeps_its_files_across_nodes_and_grows_online(
    env: &Environment,
) -> Result<()> {
    if !env.kernel_frontend {
        return Err(E2eError::Skipped(
            "a filesystem needs a kernel block device, and these nodes have no kernel frontend \
             (fuse-loop needs root)"
                .into(),
        ));
    }
    with_orchestrator(env, async |co: &mut Orchestrator<'_>| {
        cluster::ensure_priority_classes(env).await?;
        let extent = cluster::extent_size(env).await?;
        let node1 = env.nodes[0].name.clone();
        let node2 = env.nodes[1].name.clone();
        let size = 8 * extent;
        let mut request = VolumeRequest::block("e2e-filesystem", size, "high").on_node(&node1);
        request.access = Access::Mount {
            fs_type: "ext4".into(),
        };
        let vol = co.create_volume(&request).await?;

        let att = co.attach(&vol, &node1).await?;
        let file = att.pod_path()?.join("seed-001.bin");
        let data = pattern(61, 0, 1 << 20);
        write_file(&file, &data).await?;
        co.detach(&att).await?;

        let att = co.attach(&vol, &node2).await?;
        let file = att.pod_path()?.join("seed-001.bin");
        let got = read_file(&file).await?;
        ensure!(
            got == data,
            "{} on {node2} differs from what {node1} wrote (first difference at {:?})",
            file.display(),
            first_difference(&got, &data)
        );
        let before = filesystem_bytes(att.pod_path()?)?;
        if !has_capability(CAP_SYS_RESOURCE) {
            // Online ext4 growth (resize2fs on a mounted filesystem) needs CAP_SYS_RESOURCE;
            // a container without it (this harness's, and so its local node agents') cannot.
            co.detach(&att).await?;
            co.delete_volume(&vol.id).await?;
            return Err(E2eError::Skipped(format!(
                "the file written on {node1} read back on {node2}; online filesystem growth not \
                 checked: this process lacks CAP_SYS_RESOURCE, which resize2fs needs on a mounted \
                 ext4"
            )));
        }

        let new_size = size + 4 * extent;
        let (_, node_expansion) = co.expand(&vol, new_size, Some(&att)).await?;
        ensure!(
            node_expansion,
            "ControllerExpandVolume of a filesystem volume did not ask for node expansion"
        );
        let after = filesystem_bytes(att.pod_path()?)?;
        ensure!(
            after >= before + 3 * extent,
            "the filesystem at {} has {after} bytes after growing the volume by {} (was {before})",
            att.pod_path()?.display(),
            4 * extent
        );
        ensure!(
            read_file(&file).await? == data,
            "{} changed when the filesystem grew",
            file.display()
        );
        co.detach(&att).await?;
        co.delete_volume(&vol.id).await
    })
    .await
}

const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has `cap` in its effective set (`CapEff` in /proc/self/status).
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|eff| eff >> cap & 1 == 1)
}

async fn write_file(path: &std::path::Path, data: &[u8]) -> Result<()> {
    let (path, data) = (path.to_path_buf(), data.to_vec());
    let target = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&data)?;
        f.sync_all()
    })
    .await
    .map_err(|e| E2eError::io(target.clone(), std::io::Error::other(e.to_string())))?
    .map_err(|e| E2eError::io(target, e))
}

async fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    tokio::fs::read(path)
        .await
        .map_err(|e| E2eError::io(path.display().to_string(), e))
}

/// Total bytes of the filesystem mounted at `path` (what `df` shows as size).
fn filesystem_bytes(path: &std::path::Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let target = path.display().to_string();
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| E2eError::io(target.clone(), std::io::Error::other(e)))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and `st` points to writable memory of the right type.
    if unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(E2eError::io(target, std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_blocks * st.f_frsize)
}

/// Extents go back to the pool with their old bytes still on disk; a volume that receives them
/// again must read zeros where it never wrote (ARCHITECTURE §4: unwritten space reads as
/// zeros), never the previous tenant's data.
pub async fn a_new_volume_never_reads_a_deleted_volumes_data(env: &Environment) -> Result<()> {
    with_orchestrator(env, async |co: &mut Orchestrator<'_>| {
        cluster::ensure_priority_classes(env).await?;
        let extent = cluster::extent_size(env).await?;
        let (u0, _) = cluster::wait_pool_settled(env).await?;
        let node1 = env.nodes[0].name.clone();
        let size = 2 * extent;

        let previous = co
            .create_volume(&VolumeRequest::block("e2e-previous", size, "high").on_node(&node1))
            .await?;
        let old =
            cluster::extent_locations(&cluster::existing_volume(env, &previous.id).await?, extent);
        let att = co.attach(&previous, &node1).await?;
        let io = co.open_io(&att).await?;
        write_and_verify(&io, 51, 0, size).await?;
        io.close().await;
        co.detach(&att).await?;
        co.delete_volume(&previous.id).await?;
        cluster::wait_pool_unallocated(env, u0, "after deleting the previous volume").await?;

        let next = co
            .create_volume(&VolumeRequest::block("e2e-next", size, "high").on_node(&node1))
            .await?;
        let new =
            cluster::extent_locations(&cluster::existing_volume(env, &next.id).await?, extent);
        let reused: Vec<_> = new.intersection(&old).collect();
        ensure!(
            !reused.is_empty(),
            "placement gave {} none of the released extents {old:?} (got {new:?}), so this run \
             cannot show what a reused extent reads",
            next.id
        );
        let att = co.attach(&next, &node1).await?;
        let io = co.open_io(&att).await?;
        verify_zeros(&io, 0, size, "a never-written range on reused extents").await?;
        io.close().await;
        co.detach(&att).await?;
        co.delete_volume(&next.id).await
    })
    .await
}

// ---- checks shared by the scenarios ----

fn expect_code(result: Result<()>, want: Code, what: &str) -> Result<()> {
    match result {
        Ok(()) => Err(E2eError::Check(format!(
            "{what} succeeded; expected {want:?}"
        ))),
        Err(e) => match e.csi_status() {
            Some(s) if s.code() == want => Ok(()),
            _ => Err(E2eError::Check(format!(
                "{what}: expected {want:?}, got: {e}"
            ))),
        },
    }
}

async fn expect_bound_claim(env: &Environment, vol: &Provisioned) -> Result<()> {
    let (ns, name) = vol.claim()?;
    let claim = cluster::claim(env, &ns, &name).await?.ok_or_else(|| {
        E2eError::Check(format!("StorageClaim {ns}/{name} of {} is missing", vol.id))
    })?;
    let status = claim.status.unwrap_or_default();
    ensure!(
        status.phase == Some(ClaimPhase::Bound) && status.volume_name.as_deref() == Some(&vol.id),
        "StorageClaim {ns}/{name} is {:?} bound to {:?}, expected Bound to {}",
        status.phase,
        status.volume_name,
        vol.id
    );
    Ok(())
}

/// publish_context carries the committed mapping generation (seed 001's mount information).
fn expect_published_generation(att: &Attached, vv: &VirtualVolume) -> Result<()> {
    let published = att.publish_context.get(PUBLISH_GENERATION);
    let committed = cluster::mapping_generation(vv).map(|g| g.to_string());
    ensure!(
        published.is_some() && published == committed.as_ref(),
        "publish_context {PUBLISH_GENERATION}={published:?}, committed generation {committed:?}"
    );
    Ok(())
}

/// The borrower is recorded and the node reports the volume staged and running.
async fn wait_attached(env: &Environment, id: &str, node: &str) -> Result<()> {
    wait_for(&format!("{id} attached on {node}"), env.timeout, || async {
        let vv = cluster::existing_volume(env, id).await?;
        let running = vv.status.as_ref().is_some_and(|s| {
            s.attachments
                .iter()
                .any(|a| a.node == node && a.state == AttachmentState::Running)
        });
        Ok(if vv.spec.access_node.as_deref() == Some(node) && running {
            Poll::Ready(())
        } else {
            Poll::Pending(format!(
                "accessNode {:?}, attachments {:?}",
                vv.spec.access_node,
                vv.status.as_ref().map(|s| &s.attachments)
            ))
        })
    })
    .await
}

/// Seed 001 [0042]: after unmount the borrower and the node's attachment are gone.
async fn wait_detached(env: &Environment, id: &str, node: &str) -> Result<()> {
    wait_for(
        &format!("{id} detached from {node}"),
        env.timeout,
        || async {
            let vv = cluster::existing_volume(env, id).await?;
            let attached = vv
                .status
                .as_ref()
                .is_some_and(|s| s.attachments.iter().any(|a| a.node == node));
            Ok(if vv.spec.access_nodes().is_empty() && !attached {
                Poll::Ready(())
            } else {
                Poll::Pending(format!(
                    "accessNode {:?}, attachments {:?}",
                    vv.spec.access_node,
                    vv.status.as_ref().map(|s| &s.attachments)
                ))
            })
        },
    )
    .await
}

/// Seed 001 [0046]: no path to the volume exists on a node after unmount.
fn expect_no_export(co: &Orchestrator<'_>, id: &str, node: &str) -> Result<()> {
    let Ok((socket, _)) = co.nbd_export(id, node) else {
        return Ok(()); // the harness cannot see this node's files
    };
    ensure!(
        !socket.exists(),
        "NBD export {} of {id} is still there after NodeUnstage on {node}",
        socket.display()
    );
    Ok(())
}

async fn wait_gone(env: &Environment, id: &str, claim_ns: &str, claim_name: &str) -> Result<()> {
    wait_for(
        &format!("VirtualVolume {id} and StorageClaim {claim_ns}/{claim_name} deleted"),
        env.timeout,
        || async {
            let vv = cluster::volume(env, id).await?;
            let claim = cluster::claim(env, claim_ns, claim_name).await?;
            Ok(if vv.is_none() && claim.is_none() {
                Poll::Ready(())
            } else {
                Poll::Pending(format!(
                    "volume present: {}, claim present: {}",
                    vv.is_some(),
                    claim.is_some()
                ))
            })
        },
    )
    .await
}

async fn write_and_verify(io: &VolumeIo, seed: u64, offset: u64, len: u64) -> Result<()> {
    io.write_at(offset, &pattern(seed, offset, len)).await?;
    verify(io, seed, offset, len).await
}

async fn verify(io: &VolumeIo, seed: u64, offset: u64, len: u64) -> Result<()> {
    let got = io.read_at(offset, len).await?;
    let want = pattern(seed, offset, len);
    match first_difference(&got, &want) {
        None => Ok(()),
        Some(at) => Err(E2eError::Check(format!(
            "{}: bytes at {} differ from pattern {seed} (read {:?}, expected {:?})",
            io.describe(),
            offset + at as u64,
            String::from_utf8_lossy(&got[at..(at + 16).min(got.len())]),
            String::from_utf8_lossy(&want[at..(at + 16).min(want.len())]),
        ))),
    }
}

/// `what` names the range in the failure ("the expanded range").
async fn verify_zeros(io: &VolumeIo, offset: u64, len: u64, what: &str) -> Result<()> {
    let got = io.read_at(offset, len).await?;
    match got.iter().position(|b| *b != 0) {
        None => Ok(()),
        Some(at) => Err(E2eError::Check(format!(
            "{}: {what} is not zero at byte {} (reads {:?})",
            io.describe(),
            offset + at as u64,
            String::from_utf8_lossy(&got[at..(at + 16).min(got.len())]),
        ))),
    }
}
