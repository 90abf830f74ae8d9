//! The data directory: created on first start, reused after.
//!
//! ```text
//! <data-dir>/            0700
//!   ca.pem               cluster CA certificate
//!   ca.key               cluster CA private key (0600)
//!   runnel.redb          the store
//!   operator.key         the first operator API key (0600), written once at first start:
//!                        the only place its plaintext ever is; move it to a secret store
//! ```
//! The broker's server certificate is issued fresh at every start from the CA, for the
//! names configured now; runners pin the CA, not the leaf.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use runnel_certs::{CertError, ClusterCa, pem};

use crate::records::{ApiKey, Registry, Role, now_unix};
use crate::secret::{KEY_PREFIX, mint};
use crate::store::{RedbStore, Store, StoreError};

/// The file the first operator key is written to, inside the data dir.
pub(crate) const OPERATOR_KEY_FILE: &str = "operator.key";

/// What opening the data dir yields.
pub(crate) struct Opened {
    /// The cluster CA.
    pub ca: ClusterCa,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The operator key, only on the very first start (shown once, stored hashed).
    pub first_operator_key: Option<String>,
}

/// Why the data dir could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory could not be created or made private (0700).
    #[error("data dir {dir}: {source}")]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CA files could not be read, parsed, generated or written.
    #[error("cluster CA: {0}")]
    Ca(#[from] CertError),
    /// Exactly one of `ca.pem` and `ca.key` exists.
    #[error("{0} has only one of ca.pem and ca.key; restore both or neither")]
    PartialCa(PathBuf),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data dir was made for another cluster name.
    #[error("data dir belongs to cluster {stored:?}, not {wanted:?}")]
    WrongCluster {
        /// The name recorded at first start.
        stored: String,
        /// The name configured now.
        wanted: String,
    },
}

/// Opens the data dir, creating it and its contents on first start.
pub(crate) async fn open(dir: &Path, cluster: &str) -> Result<Opened, DataDirError> {
    let io = |source| DataDirError::Io { dir: dir.into(), source };
    fs::create_dir_all(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = match (ca_pem.exists(), ca_key.exists()) {
        (true, true) => ClusterCa::from_pem(cluster, &pem::read(&ca_pem)?, &pem::read(&ca_key)?)?,
        (false, false) => {
            let ca = ClusterCa::generate(cluster)?;
            pem::write_private(&ca_key, &ca.key_pem())?;
            pem::write_public(&ca_pem, ca.cert_pem())?;
            ca
        }
        _ => return Err(DataDirError::PartialCa(dir.into())),
    };
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.join("runnel.redb"))?);
    match store.get("meta/cluster").await? {
        Some(stored) if stored != cluster.as_bytes() => {
            return Err(DataDirError::WrongCluster {
                stored: String::from_utf8_lossy(&stored).into_owned(),
                wanted: cluster.to_owned(),
            });
        }
        Some(_) => {}
        None => store.put("meta/cluster", cluster.as_bytes().to_vec()).await?,
    }
    let first_operator_key = if store.get("meta/operator-key-issued").await?.is_none() {
        let minted = mint(KEY_PREFIX);
        let rec = ApiKey {
            id: minted.id,
            role: Role::Operator,
            tenant: None,
            owner: None,
            secret: minted.hashed,
            created_at: now_unix(),
            expires_at: None,
            revoked_at: None,
        };
        // The key goes to a 0600 file, never to stdout (and from there into journald).
        pem::write_private(&dir.join(OPERATOR_KEY_FILE), &format!("{}\n", minted.plaintext))?;
        Registry::new(store.clone()).put_key(&rec).await?;
        store.put("meta/operator-key-issued", b"1".to_vec()).await?;
        Some(minted.plaintext)
    } else {
        None
    };
    Ok(Opened { ca, store, first_operator_key })
}
