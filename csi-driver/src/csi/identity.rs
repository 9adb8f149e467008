//! CSI Identity: the same in both modes; readiness is supplied by the mode.

use std::sync::Arc;

use tessera_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse, identity_server,
    plugin_capability,
};
use tonic::{Request, Response, Status};

/// Answers Probe: `Ok(())` when ready, `Err(reason)` while not (the reason is logged, the
/// CO sees `ready: false`).
pub type Readiness =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

pub struct IdentityService {
    name: String,
    controller: bool,
    readiness: Readiness,
}

impl IdentityService {
    /// `controller`: advertise CONTROLLER_SERVICE (controller mode).
    pub fn new(name: impl Into<String>, controller: bool, readiness: Readiness) -> Self {
        Self {
            name: name.into(),
            controller,
            readiness,
        }
    }
}

fn service(t: plugin_capability::service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        let mut capabilities = vec![service(Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.insert(0, service(Type::ControllerService));
        }
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = match (self.readiness)().await {
            Ok(()) => true,
            Err(reason) => {
                tracing::info!(%reason, "probe: not ready");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
