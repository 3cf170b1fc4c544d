//! The controller's certificate authority: made on first start, kept in the
//! store, it signs the controller's own QUIC server certificate and every
//! enrolled agent's client certificate.
//!
//! Agents pin the CA by the SHA-256 of its DER encoding (carried in the join
//! token). A client certificate names its node in the subject CN; the store
//! records the fingerprint of the one certificate each node holds, so a
//! certificate that is not that one (reissued, revoked, unknown) is refused even
//! though the CA signed it.

use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::time::{Duration, SystemTime};

/// How long an agent's client certificate is valid. Long, because revocation is
/// by the store (the fingerprint check), not by expiry.
pub const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 86_400);
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Certificates start to be valid a little before now: clocks of VMs differ.
const BACKDATE: Duration = Duration::from_secs(3600);

pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// The CA as rcgen needs it to sign: same subject and key as `cert_der`.
    issuer: rcgen::Certificate,
}

/// A certificate issued to an agent.
#[derive(Debug, Clone)]
pub struct Issued {
    pub pem: String,
    pub sha256: String,
}

impl Ca {
    /// A fresh CA with an ECDSA P-256 key.
    pub fn generate(now: SystemTime) -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating the CA key")?;
        let params = ca_params(now)?;
        let cert = params.self_signed(&key).context("signing the CA")?;
        let cert_pem = cert.pem();
        Self::from_pem(&cert_pem, &key.serialize_pem())
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).context("parsing the CA certificate")?;
        let cert_der = pem_to_der(cert_pem)?;
        let issuer = params
            .self_signed(&key)
            .context("the CA key does not match the CA certificate")?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The pin agents check: lower-case hex SHA-256 of the CA certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// A server certificate for [`skymesh_wire::control::SERVER_NAME`] with a
    /// fresh key, and the chain to present (leaf, then the CA, so that an agent
    /// holding only the pin can verify it).
    pub fn issue_server(
        &self,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating the server key")?;
        let mut params =
            CertificateParams::new(vec![skymesh_wire::control::SERVER_NAME.to_string()])
                .context("server certificate parameters")?;
        params.distinguished_name = dn(skymesh_wire::control::SERVER_NAME);
        params.serial_number = Some(serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + SERVER_CERT_VALIDITY).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .context("signing the server certificate")?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    /// Signs an agent's CSR as node `node`. Only the CSR's public key is used:
    /// the subject, validity and usages are the controller's choice.
    pub fn sign_client(&self, csr_pem: &str, node: &str, now: SystemTime) -> Result<Issued> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow!("the certificate signing request is invalid: {e}"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(node);
        params.subject_alt_names =
            vec![SanType::DnsName(node.to_string().try_into().map_err(
                |e| anyhow!("node name {node:?} is not a valid DNS name: {e}"),
            )?)];
        params.serial_number = Some(serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CLIENT_CERT_VALIDITY).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer, &self.key)
            .context("signing the client certificate")?;
        Ok(Issued {
            pem: cert.pem(),
            sha256: fingerprint(cert.der()),
        })
    }
}

fn ca_params(now: SystemTime) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn("skymesh controller CA");
    params.serial_number = Some(serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    Ok(params)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive integer in DER.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Lower-case hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    sha256_hex(der)
}

/// Lower-case hex SHA-256 of `bytes` (fingerprints, and the stored form of
/// token secrets).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
    Ok(CertificateDer::from(block.contents))
}

/// The node name a client certificate was issued to (its subject CN).
pub fn client_name(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("unparsable client certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| anyhow!("client certificate has no common name"))?;
    Ok(cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(name: &str) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        let csr = params.serialize_request(&key).expect("csr");
        (csr.pem().expect("pem"), key)
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = Ca::generate(SystemTime::now()).expect("ca");
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).expect("reload");
        assert_eq!(ca.fingerprint(), again.fingerprint());
        assert_eq!(ca.fingerprint().len(), 64);
    }

    #[test]
    fn client_certificate_names_the_node_not_the_csr_subject() {
        let ca = Ca::generate(SystemTime::now()).expect("ca");
        let (pem, _key) = csr("i-want-to-be-admin");
        let issued = ca
            .sign_client(&pem, "aws-gw", SystemTime::now())
            .expect("sign");
        let der = pem_to_der(&issued.pem).expect("der");
        assert_eq!(client_name(&der).expect("cn"), "aws-gw");
        assert_eq!(fingerprint(&der), issued.sha256);
        // Chains to the CA: verify the signature with x509-parser.
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let (_, root) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        leaf.verify_signature(Some(root.public_key()))
            .expect("signed by the CA");
    }

    #[test]
    fn garbage_csr_is_refused_with_a_message() {
        let ca = Ca::generate(SystemTime::now()).expect("ca");
        let err = ca
            .sign_client(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "x",
                SystemTime::now(),
            )
            .expect_err("garbage");
        assert!(
            err.to_string().contains("signing request is invalid"),
            "{err}"
        );
    }
}
