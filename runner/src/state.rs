//! The runner's state dir.
//!
//! ```text
//! <state-dir>/        0700 (default: StateDir::default_path, outside job working dirs)
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

    /// Creates the directory owner-only (0700), or accepts an existing one that is
    /// already private. An existing directory is never chmod-ed (`--state-dir /tmp` must
    /// not break `/tmp`): one that others can read or enter is refused.
    pub fn create(&self) -> Result<(), RunnerError> {
        use std::os::unix::fs::DirBuilderExt;
        let err = |e: std::io::Error| RunnerError::state(format!("{}", self.dir.display()), e);
        match fs::metadata(&self.dir) {
            Ok(m) if !m.is_dir() => Err(RunnerError::state(
                format!("{}", self.dir.display()),
                "exists and is not a directory",
            )),
            Ok(m) if m.permissions().mode() & 0o077 != 0 => Err(RunnerError::state(
                format!("{}", self.dir.display()),
                format!(
                    "has loose permissions ({:o}); use a new directory, or one only its owner \
                     can use (chmod 700)",
                    m.permissions().mode() & 0o777
                ),
            )),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Where the state dir lives by default: outside any job's working directory (every
    /// `exec` job runs in a fresh temp dir). `/var/lib/runnel-runner` for root, else
    /// `$XDG_STATE_HOME/runnel-runner` (default `~/.local/state/runnel-runner`).
    pub fn default_path() -> Result<PathBuf, RunnerError> {
        if nix::unistd::geteuid().is_root() {
            return Ok(PathBuf::from("/var/lib/runnel-runner"));
        }
        let xdg = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
        xdg.or_else(|| home.map(|h| h.join(".local/state")))
            .map(|base| base.join("runnel-runner"))
            .ok_or_else(|| {
                RunnerError::state(
                    "default",
                    "neither XDG_STATE_HOME nor HOME is set; pass --state-dir",
                )
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_makes_a_private_dir_and_never_chmods_an_existing_one() {
        let dir = tempfile::tempdir().expect("dir");
        let fresh = StateDir::new(dir.path().join("a/b"));
        fresh.create().expect("create");
        let mode = fs::metadata(fresh.path()).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fresh.create().expect("an existing private dir is fine");
        let loose = dir.path().join("loose");
        fs::create_dir(&loose).expect("mkdir");
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = StateDir::new(&loose).create().expect_err("loose permissions");
        assert!(e.to_string().contains("loose permissions (755)"), "{e}");
        let mode = fs::metadata(&loose).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "left as it was");
        let file = dir.path().join("file");
        fs::write(&file, b"x").expect("write");
        assert!(StateDir::new(&file).create().is_err());
    }
}
