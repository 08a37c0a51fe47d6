//! Identity: the fleet's certificate authority, and who a certificate says its holder is.
//!
//! `fedge-coordinator certs init` makes a CA, the coordinator's server certificate and a
//! model-signing key in one folder; `issue-device`, `issue-operator` and `issue-aggregator` sign client
//! certificates; `revoke` adds a certificate to the revocation list (`crl.pem`) that the
//! coordinator loads. A client's role and id are taken from its certificate's common name
//! (`device:ID`, `operator:NAME` or `aggregator:NAME`), never from anything the client says.
//!
//! Folder layout: `ca.pem`, `ca.key` (keep it offline in production), `server.pem`,
//! `server.key`, `model-signing.key`, `crl.pem`, `issued.json` (what was issued, serials,
//! revocations), `devices/ID.{pem,key}`, `operators/NAME.{pem,key}`,
//! `aggregators/NAME.{pem,key}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::RngExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A fleet device: trains, uploads, downloads models.
    Device,
    /// An operator: starts and watches rounds, manages models.
    Operator,
    /// A regional aggregator: takes part in rounds like a device, on behalf of the devices
    /// that connect to it, and sends their weighted mean.
    Aggregator,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Operator => "operator",
            Role::Aggregator => "aggregator",
        }
    }
}

/// Who a verified peer is, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Device or operator.
    pub role: Role,
    /// The device id or operator name.
    pub id: String,
}

/// Certificate errors.
#[derive(Debug, Error)]
pub enum CertError {
    /// File system trouble.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The folder already holds a CA.
    #[error("{0} already holds a CA (ca.pem); refusing to overwrite it")]
    Exists(PathBuf),
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Names must be short and plain.
    #[error("invalid name `{0}`: use 1-64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// Issued twice.
    #[error("{0} already has a certificate")]
    AlreadyIssued(String),
    /// Revoking something never issued.
    #[error("no certificate was issued to {0}")]
    Unknown(String),
    /// A peer certificate without a Fedge identity.
    #[error("certificate has no Fedge identity: {0}")]
    NoIdentity(String),
    /// `issued.json` is damaged.
    #[error("issued.json: {0}")]
    Index(String),
    /// A validity outside 1 to [`MAX_DAYS`] days (0 would issue an already-expired certificate).
    #[error("validity must be 1 to {MAX_DAYS} days, got {0}")]
    BadDays(i64),
}

/// The longest validity `issue` grants: 100 years.
pub const MAX_DAYS: i64 = 36_500;

#[derive(Debug, Default, Serialize, Deserialize)]
struct IssuedIndex {
    /// Common name -> record.
    certs: BTreeMap<String, IssuedRecord>,
    crl_number: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct IssuedRecord {
    serial_hex: String,
    revoked_at_unix: Option<i64>,
}

/// Paths of an issued certificate and its key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate, PEM.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8).
    pub key: PathBuf,
}

/// A certificate folder (see the module docs).
#[derive(Debug, Clone)]
pub struct CertDir {
    dir: PathBuf,
}

/// Signs model records with the coordinator's Ed25519 model-signing key.
pub struct ModelSigner {
    key: KeyPair,
}

impl std::fmt::Debug for ModelSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelSigner({})", hex(self.key.public_key_raw()))
    }
}

impl ModelSigner {
    /// Fills in `record.signature` over its signing payload.
    pub fn sign(&self, record: &mut fedge_core::registry::ModelRecord) -> Result<(), CertError> {
        use rcgen::SigningKey;
        record.signature = self.key.sign(&record.signing_payload())?;
        Ok(())
    }

    /// Fills in `promotion.signature` over its signing payload.
    pub fn sign_promotion(&self, promotion: &mut fedge_core::registry::Promotion) -> Result<(), CertError> {
        use rcgen::SigningKey;
        promotion.signature = self.key.sign(&promotion.signing_payload())?;
        Ok(())
    }

    /// The raw public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |cause| CertError::Io { path: path.to_path_buf(), cause }
}

/// Writes `text` to `path` atomically: a temporary file beside it (mode 0600 from its creation
/// when `secret`, so a private key is never readable by others, not even for a moment), synced,
/// then renamed over `path`, and the folder synced. A crash leaves the old file or the new one,
/// never half of one.
fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), CertError> {
    use std::io::Write;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    if secret {
        // A leftover temporary file keeps its old mode through `open`: narrow it first.
        restrict(&file).map_err(io(&tmp))?;
    }
    file.write_all(text.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(dir) = std::fs::File::open(parent) {
        dir.sync_all().map_err(io(parent))?;
    }
    Ok(())
}

/// A certificate, CRL or index: readable by all, written atomically.
fn write(path: &Path, text: &str) -> Result<(), CertError> {
    write_file(path, text, false)
}

/// A private key: mode 0600 from creation on, written atomically.
fn write_secret(path: &Path, text: &str) -> Result<(), CertError> {
    write_file(path, text, true)
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(io(path))
}

fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok { Ok(()) } else { Err(CertError::BadName(name.to_string())) }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn leaf_params(common_name: &str, sans: Vec<String>, days: i64) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Fedge");
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    p.serial_number = Some(random_serial());
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl CertDir {
    /// Creates a CA, a server certificate for `server_names` (DNS names or IP addresses) and a
    /// model-signing key in `dir`. Refuses to overwrite an existing CA.
    pub fn init(dir: &Path, server_names: &[String]) -> Result<Self, CertError> {
        if dir.join("ca.pem").exists() {
            return Err(CertError::Exists(dir.to_path_buf()));
        }
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Fedge fleet CA");
        dn.push(DnType::OrganizationName, "Fedge");
        ca.distinguished_name = dn;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        ca.not_before = now - Duration::hours(1);
        ca.not_after = now + Duration::days(3650);
        ca.serial_number = Some(random_serial());
        ca.key_identifier_method = KeyIdMethod::Sha256;
        let ca_cert = ca.self_signed(&ca_key)?;
        let me = Self { dir: dir.to_path_buf() };
        write(&dir.join("ca.pem"), &ca_cert.pem())?;
        write_secret(&dir.join("ca.key"), &ca_key.serialize_pem())?;

        let issuer = Issuer::new(ca, ca_key);
        let mut names = server_names.to_vec();
        if names.is_empty() {
            names = vec!["localhost".into(), "127.0.0.1".into()];
        }
        let mut server = leaf_params("coordinator", names, 825)?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;
        write(&dir.join("server.pem"), &server_cert.pem())?;
        write_secret(&dir.join("server.key"), &server_key.serialize_pem())?;

        let signing = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        write_secret(&dir.join("model-signing.key"), &signing.serialize_pem())?;
        write(&dir.join("model-signing.pub"), &format!("{}\n", hex(signing.public_key_raw())))?;

        me.save_index(&IssuedIndex::default())?;
        me.write_crl(&issuer, &IssuedIndex::default())?;
        Ok(me)
    }

    /// The model-signing key (Ed25519), to sign registry records.
    pub fn model_signer(&self) -> Result<ModelSigner, CertError> {
        let key = KeyPair::from_pem(&read(&self.dir.join("model-signing.key"))?)?;
        Ok(ModelSigner { key })
    }

    /// `model-signing.pub`: the raw Ed25519 public key devices verify models with, as hex.
    pub fn model_public_key_path(&self) -> PathBuf {
        self.dir.join("model-signing.pub")
    }

    /// Opens an existing folder.
    pub fn open(dir: &Path) -> Result<Self, CertError> {
        read(&dir.join("ca.pem"))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// CA certificate path.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Server certificate and key paths.
    pub fn server(&self) -> Issued {
        Issued { cert: self.dir.join("server.pem"), key: self.dir.join("server.key") }
    }

    /// Revocation list path.
    pub fn crl_pem(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CertError> {
        let key = KeyPair::from_pem(&read(&self.dir.join("ca.key"))?)?;
        Ok(Issuer::from_ca_cert_pem(&read(&self.ca_pem())?, key)?)
    }

    fn load_index(&self) -> Result<IssuedIndex, CertError> {
        let path = self.dir.join("issued.json");
        serde_json::from_str(&read(&path)?).map_err(|e| CertError::Index(e.to_string()))
    }

    fn save_index(&self, index: &IssuedIndex) -> Result<(), CertError> {
        let text = serde_json::to_string_pretty(index).map_err(|e| CertError::Index(e.to_string()))?;
        write(&self.dir.join("issued.json"), &text)
    }

    /// Issues a client certificate (valid `days`) for a device id or operator name.
    pub fn issue(&self, role: Role, name: &str, days: i64) -> Result<Issued, CertError> {
        check_name(name)?;
        if !(1..=MAX_DAYS).contains(&days) {
            return Err(CertError::BadDays(days));
        }
        let cn = format!("{}:{name}", role.prefix());
        let mut index = self.load_index()?;
        if index.certs.contains_key(&cn) {
            return Err(CertError::AlreadyIssued(cn));
        }
        let mut params = leaf_params(&cn, Vec::new(), days)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serial = params.serial_number.clone().expect("set by leaf_params");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let folder = self.dir.join(format!("{}s", role.prefix()));
        let issued = Issued { cert: folder.join(format!("{name}.pem")), key: folder.join(format!("{name}.key")) };
        write(&issued.cert, &cert.pem())?;
        write_secret(&issued.key, &key.serialize_pem())?;
        index.certs.insert(cn, IssuedRecord { serial_hex: hex(serial.as_ref()), revoked_at_unix: None });
        self.save_index(&index)?;
        Ok(issued)
    }

    /// Revokes the certificate of a device id or operator name and re-signs the CRL. The
    /// coordinator refuses it from its next start (or CRL reload) on.
    pub fn revoke(&self, role: Role, name: &str) -> Result<(), CertError> {
        let cn = format!("{}:{name}", role.prefix());
        let mut index = self.load_index()?;
        let rec = index.certs.get_mut(&cn).ok_or_else(|| CertError::Unknown(cn.clone()))?;
        if rec.revoked_at_unix.is_none() {
            rec.revoked_at_unix = Some(OffsetDateTime::now_utc().unix_timestamp());
        }
        index.crl_number += 1;
        self.write_crl(&self.issuer()?, &index)?;
        self.save_index(&index)
    }

    fn write_crl(&self, issuer: &Issuer<'_, KeyPair>, index: &IssuedIndex) -> Result<(), CertError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked = Vec::new();
        for rec in index.certs.values() {
            if let Some(at) = rec.revoked_at_unix {
                let serial = unhex(&rec.serial_hex).ok_or_else(|| CertError::Index("bad serial".into()))?;
                revoked.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
                    reason_code: None,
                    invalidity_date: None,
                });
            }
        }
        let crl = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(365),
            crl_number: SerialNumber::from(index.crl_number + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(issuer)?;
        write(&self.crl_pem(), &crl.pem()?)
    }
}

/// Reads the Fedge identity (`device:ID`, `operator:NAME` or `aggregator:NAME` common name) of a DER certificate
/// that TLS has already verified against the CA.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| CertError::NoIdentity(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| CertError::NoIdentity("no common name".into()))?;
    let (role, id) = match cn.split_once(':') {
        Some(("device", id)) => (Role::Device, id),
        Some(("operator", id)) => (Role::Operator, id),
        Some(("aggregator", id)) => (Role::Aggregator, id),
        _ => return Err(CertError::NoIdentity(format!("common name `{cn}`"))),
    };
    check_name(id).map_err(|_| CertError::NoIdentity(format!("common name `{cn}`")))?;
    Ok(Identity { role, id: id.to_string() })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(unix)]
fn restrict(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict(_file: &std::fs::File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests;
