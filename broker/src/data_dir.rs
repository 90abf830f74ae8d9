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

use crate::config::Config;
use crate::records::{ApiKey, Registry, Role, now_unix};
use crate::secret::{KEY_PREFIX, mint};
use crate::store::{EtcdOptions, EtcdStore, RedbStore, Store, StoreError};

/// The file the first operator key is written to, inside the data dir.
pub(crate) const OPERATOR_KEY_FILE: &str = "operator.key";

/// What opening the data dir yields.
pub(crate) struct Opened {
    /// The cluster CA.
    pub ca: ClusterCa,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The same store when it is etcd, for the cluster's leases and placement.
    pub etcd: Option<EtcdStore>,
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

/// Opens the data dir, creating it and its contents on first start. With etcd configured,
/// the store and the cluster CA live in etcd instead (the first node creates the CA, and
/// every later node loads it); the data dir then only receives the operator key file, on
/// the node that created that key.
pub(crate) async fn open(config: &Config) -> Result<Opened, DataDirError> {
    let dir = config.data_dir.as_path();
    let cluster = config.cluster.as_str();
    let io = |source| DataDirError::Io { dir: dir.into(), source };
    fs::create_dir_all(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    let (store, etcd): (Arc<dyn Store>, _) = if config.etcd.is_empty() {
        (Arc::new(RedbStore::open(&dir.join("runnel.redb"))?), None)
    } else {
        let options =
            EtcdOptions { endpoints: config.etcd.clone(), prefix: config.etcd_prefix.clone() };
        let etcd = connect_etcd(&options).await?;
        (Arc::new(etcd.clone()), Some(etcd))
    };
    // The cluster name first: a data dir or prefix of another cluster is left untouched.
    if !store.compare_and_swap(META_CLUSTER, None, Some(cluster.as_bytes().to_vec())).await? {
        match store.get(META_CLUSTER).await? {
            Some(stored) if stored == cluster.as_bytes() => {}
            stored => {
                return Err(DataDirError::WrongCluster {
                    stored: String::from_utf8_lossy(&stored.unwrap_or_default()).into_owned(),
                    wanted: cluster.to_owned(),
                });
            }
        }
    }
    let ca = match etcd {
        None => ca_in_files(dir, cluster)?,
        Some(_) => ca_in_store(store.as_ref(), cluster).await?,
    };
    let first_operator_key = issue_operator_key_once(store.clone(), dir).await?;
    Ok(Opened { ca, store, etcd, first_operator_key })
}

/// How long a starting node waits for etcd to answer before it gives up: nodes and etcd
/// are often started together (one script, one boot), and etcd takes a moment to listen.
const ETCD_START_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Connects to etcd, retrying while no endpoint answers, for up to [`ETCD_START_WAIT`].
async fn connect_etcd(options: &EtcdOptions) -> Result<EtcdStore, StoreError> {
    let deadline = tokio::time::Instant::now() + ETCD_START_WAIT;
    let mut said = false;
    loop {
        match EtcdStore::connect(options).await {
            Err(StoreError::Unavailable(why)) if tokio::time::Instant::now() < deadline => {
                if !said {
                    tracing::warn!(endpoints = ?options.endpoints, error = %why,
                        "etcd does not answer yet; retrying for up to {}s", ETCD_START_WAIT.as_secs());
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            r => return r,
        }
    }
}

const META_CLUSTER: &str = "meta/cluster";
const META_CA: &str = "meta/ca";
const META_OPERATOR_KEY: &str = "meta/operator-key-issued";

fn ca_in_files(dir: &Path, cluster: &str) -> Result<ClusterCa, DataDirError> {
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    match (ca_pem.exists(), ca_key.exists()) {
        (true, true) => {
            Ok(ClusterCa::from_pem(cluster, &pem::read(&ca_pem)?, &pem::read(&ca_key)?)?)
        }
        (false, false) => {
            let ca = ClusterCa::generate(cluster)?;
            pem::write_private(&ca_key, &ca.key_pem())?;
            pem::write_public(&ca_pem, ca.cert_pem())?;
            Ok(ca)
        }
        _ => Err(DataDirError::PartialCa(dir.into())),
    }
}

/// The CA as stored in etcd (`meta/ca`), which is why etcd itself must be protected.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredCa {
    cert_pem: String,
    key_pem: String,
}

/// Loads the cluster CA from the store, or creates it there if no node has yet: create-if-
/// absent, so that two nodes starting at once on an empty prefix agree on one CA.
async fn ca_in_store(store: &dyn Store, cluster: &str) -> Result<ClusterCa, DataDirError> {
    let load = |bytes: &[u8]| -> Result<ClusterCa, DataDirError> {
        let stored: StoredCa = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt { key: META_CA.into(), message: e.to_string() })?;
        Ok(ClusterCa::from_pem(cluster, &stored.cert_pem, &stored.key_pem)?)
    };
    if let Some(bytes) = store.get(META_CA).await? {
        return load(&bytes);
    }
    let ca = ClusterCa::generate(cluster)?;
    let stored = StoredCa { cert_pem: ca.cert_pem().to_owned(), key_pem: ca.key_pem() };
    let bytes = serde_json::to_vec(&stored).map_err(|e| StoreError::Engine(e.to_string()))?;
    if store.compare_and_swap(META_CA, None, Some(bytes)).await? {
        return Ok(ca);
    }
    // Another node created it first.
    match store.get(META_CA).await? {
        Some(bytes) => load(&bytes),
        None => Err(StoreError::Engine("meta/ca vanished while being created".into()).into()),
    }
}

/// Mints the first operator key, exactly once per store: its plaintext goes to a 0600 file
/// in `dir` first (never to stdout), then its record, then the create-if-absent marker. A
/// node that loses the race to another takes its own key back out.
async fn issue_operator_key_once(
    store: Arc<dyn Store>,
    dir: &Path,
) -> Result<Option<String>, DataDirError> {
    if store.get(META_OPERATOR_KEY).await?.is_some() {
        return Ok(None);
    }
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
    let file = dir.join(OPERATOR_KEY_FILE);
    pem::write_private(&file, &format!("{}\n", minted.plaintext))?;
    let registry = Registry::new(store.clone());
    registry.put_key(&rec).await?;
    if store.compare_and_swap(META_OPERATOR_KEY, None, Some(rec.id.clone().into_bytes())).await? {
        return Ok(Some(minted.plaintext));
    }
    store.delete(&format!("keys/{}", rec.id)).await?;
    let _ = fs::remove_file(&file);
    Ok(None)
}
