//! PEM files on disk. Private keys are created with mode 0600 and never widened.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::CertError;

fn io_err(path: &Path, source: std::io::Error) -> CertError {
    CertError::Io { path: path.display().to_string(), source }
}

/// Writes a secret (private key, token) readable by the owner only. The file is replaced
/// atomically through a temporary file created 0600, so it is never briefly world-readable.
pub fn write_private(path: &Path, contents: &str) -> Result<(), CertError> {
    write_with_mode(path, contents, 0o600)
}

/// Writes a public file (certificate, CA) with mode 0644.
pub fn write_public(path: &Path, contents: &str) -> Result<(), CertError> {
    write_with_mode(path, contents, 0o644)
}

fn write_with_mode(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.write_all(contents.as_bytes()).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Reads a whole text file.
pub fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// All certificates in a PEM string.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Malformed(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::Malformed("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// The private key in a PEM string.
pub fn private_key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CertError::Malformed(format!("private key PEM: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_even_when_replacing_a_wider_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        fs::write(&path, "old").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");
        write_private(&path, "secret").expect("write_private");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read(&path).expect("read"), "secret");
    }

    #[test]
    fn garbage_pem_is_an_error() {
        assert!(certs_from_pem("not pem").is_err());
        assert!(
            private_key_from_pem("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
    }
}
