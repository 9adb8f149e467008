//! `<data-dir>/endpoints.json` (what `tessera local` publishes for scripts and people) and the
//! `<state-dir>/node.json` each node agent writes (docs: the `tessera local` contract).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `endpoints.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    pub kubeconfig: PathBuf,
    pub apiserver: String,
    pub controller: ControllerEndpoint,
    pub nodes: Vec<NodeEndpoint>,
    /// Staged volumes by volume id.
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeEndpoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerEndpoint {
    pub csi_socket: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeEndpoint {
    pub name: String,
    pub csi_socket: PathBuf,
    pub state_dir: PathBuf,
    #[serde(default)]
    pub extent_server: String,
    #[serde(default)]
    pub control_endpoint: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeEndpoint {
    pub node: String,
    pub nbd_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// `<state-dir>/node.json`, written by the node agent on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFile {
    pub node_id: String,
    #[serde(default)]
    pub csi_socket: String,
    #[serde(default)]
    pub extent_server: String,
    #[serde(default)]
    pub control_endpoint: String,
    #[serde(default)]
    pub volumes: BTreeMap<String, NodeVolume>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeVolume {
    pub nbd_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default)]
    pub staging_path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0:?} is not an NBD unix URI (nbd+unix:///<export>?socket=<path>)")]
    NbdUri(String),
}

impl Endpoints {
    pub fn load(path: &Path) -> Result<Self, EndpointsError> {
        read_json(path)
    }

    /// Writes atomically (temporary file + rename), so readers never see half a file.
    pub fn write(&self, path: &Path) -> Result<(), EndpointsError> {
        let bytes = serde_json::to_vec_pretty(self).expect("endpoints serialize");
        write_atomically(path, &bytes).map_err(|source| EndpointsError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The node entry named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeEndpoint> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Takes over what the nodes' `node.json` files say: extent and control endpoints, and the
    /// volumes staged on each. Returns whether anything changed.
    pub fn merge_node_files(&mut self, files: &[NodeFile]) -> bool {
        let before = self.clone();
        let mut volumes = BTreeMap::new();
        for file in files {
            if let Some(node) = self.nodes.iter_mut().find(|n| n.name == file.node_id) {
                if !file.extent_server.is_empty() {
                    node.extent_server = file.extent_server.clone();
                }
                if !file.control_endpoint.is_empty() {
                    node.control_endpoint = file.control_endpoint.clone();
                }
            }
            for (id, v) in &file.volumes {
                volumes.insert(
                    id.clone(),
                    VolumeEndpoint {
                        node: file.node_id.clone(),
                        nbd_uri: v.nbd_uri.clone(),
                        device: v.device.clone(),
                    },
                );
            }
        }
        self.volumes = volumes;
        *self != before
    }
}

impl NodeFile {
    pub fn load(path: &Path) -> Result<Self, EndpointsError> {
        read_json(path)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EndpointsError> {
    let bytes = std::fs::read(path).map_err(|source| EndpointsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| EndpointsError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// `nbd+unix:///<export>?socket=<path>` → (socket path, export name).
pub fn parse_nbd_unix_uri(uri: &str) -> Result<(PathBuf, String), EndpointsError> {
    let bad = || EndpointsError::NbdUri(uri.to_string());
    let rest = uri.strip_prefix("nbd+unix://").ok_or_else(bad)?;
    let (path, query) = rest.split_once('?').ok_or_else(bad)?;
    let export = path.strip_prefix('/').unwrap_or(path).to_string();
    let socket = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))
        .filter(|s| !s.is_empty())
        .ok_or_else(bad)?;
    Ok((
        PathBuf::from(percent_decode(socket)),
        percent_decode(&export),
    ))
}

/// Undoes `%XX` escapes (a URI may escape characters of the socket path).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nbd_unix_uris() {
        let (socket, export) =
            parse_nbd_unix_uri("nbd+unix:///vol-1?socket=/tmp/d/node-a/nbd/vol-1.sock").unwrap();
        assert_eq!(socket, PathBuf::from("/tmp/d/node-a/nbd/vol-1.sock"));
        assert_eq!(export, "vol-1");
        let (socket, _) = parse_nbd_unix_uri("nbd+unix:///v?socket=/a%20b/s.sock").unwrap();
        assert_eq!(socket, PathBuf::from("/a b/s.sock"));
        assert!(parse_nbd_unix_uri("nbd://host/v").is_err());
        assert!(parse_nbd_unix_uri("nbd+unix:///v").is_err());
    }
}
