//! The kubeconfig the server writes for `kubectl` (plain http, no credentials), and the matching
//! kube-rs client configuration.

use std::io::Write;
use std::path::Path;

/// The kubeconfig document for a server at `url`.
pub fn render(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: tessera
  cluster:
    server: {url}
contexts:
- name: tessera
  context:
    cluster: tessera
    namespace: default
    user: tessera
current-context: tessera
preferences: {{}}
users:
- name: tessera
  user: {{}}
"
    )
}

/// Writes the kubeconfig atomically (temporary file + rename).
pub fn write(path: &Path, url: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(render(url).as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// A kube-rs configuration for a server at `url`.
pub fn client_config(url: &str) -> Result<kube::Config, crate::StartError> {
    let uri: axum::http::Uri = url
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| crate::StartError::Url(e.to_string()))?;
    let mut config = kube::Config::new(uri);
    config.default_namespace = "default".into();
    Ok(config)
}
