//! The runner's state dir.
//!
//! ```text
//! <state-dir>/        0700
//!   key.pem           ed25519 private key (0600; generated here, never sent)
//!   cert.pem          runner certificate (replaced on renewal)
//!   ca.pem            cluster CA, pinned at enrollment
//!   runner.toml       broker address and identity
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use runnel_certs::pem;
use serde::{Deserialize, Serialize};

use crate::RunnerError;

/// `runner.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerInfo {
    /// `host:port` of the broker.
    pub broker: String,
    /// Runner id.
    pub runner_id: String,
    /// Tenant.
    pub tenant: String,
    /// Owner.
    pub owner: String,
}

/// A state dir on disk.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Uses `dir` (not created until [`StateDir::create`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory, owner-only.
    pub fn create(&self) -> Result<(), RunnerError> {
        let err = |e: std::io::Error| RunnerError::state(format!("{}", self.dir.display()), e);
        fs::create_dir_all(&self.dir).map_err(err)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(err)
    }

    /// Path of the private key.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// Path of the certificate.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// Path of the CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn info_path(&self) -> PathBuf {
        self.dir.join("runner.toml")
    }

    /// Whether this dir already holds an enrolled runner.
    pub fn is_enrolled(&self) -> bool {
        self.info_path().exists() && self.cert_path().exists()
    }

    /// Reads `runner.toml`.
    pub fn info(&self) -> Result<RunnerInfo, RunnerError> {
        let p = self.info_path();
        let text = fs::read_to_string(&p).map_err(|e| {
            RunnerError::state(format!("{} (has this runner been enrolled?)", p.display()), e)
        })?;
        toml::from_str(&text).map_err(|e| RunnerError::state(format!("{}", p.display()), e))
    }

    /// Writes `runner.toml`.
    pub fn write_info(&self, info: &RunnerInfo) -> Result<(), RunnerError> {
        let text = toml::to_string(info)
            .map_err(|e| RunnerError::state(format!("{}", self.info_path().display()), e))?;
        Ok(pem::write_public(&self.info_path(), &text)?)
    }

    /// Reads a PEM file of this dir.
    pub fn read(&self, path: &Path) -> Result<String, RunnerError> {
        Ok(pem::read(path)?)
    }
}
