//! A test PKI for DTLS certificate mode: a CA, and certificates it signs
//! for the gateway and the devices, ECDSA P-256 as RFC 7252 section
//! 9.1.3.3 has them, written to PEM files (keys readable by their owner
//! only, as the router demands).

use std::os::unix::fs::PermissionsExt;

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

use crate::TempPath;

/// A certificate and its key, in memory and in PEM files.
pub struct Issued {
    pub cert: X509,
    pub key: PKey<Private>,
    pub cert_file: TempPath,
    pub key_file: TempPath,
}

/// A CA of its own, which signs what the test asks for.
pub struct Pki {
    pub ca: Issued,
    tag: String,
}

/// Subject alternative names of a certificate.
#[derive(Default)]
pub struct Names<'a> {
    pub dns: &'a [&'a str],
    pub uri: &'a [&'a str],
    pub ip: &'a [&'a str],
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let key = ec_key();
        let cert = build(
            &format!("{tag} test CA"),
            &Names::default(),
            &key,
            None,
            true,
        );
        Pki {
            ca: write(&format!("{tag}-ca"), cert, key),
            tag: tag.to_owned(),
        }
    }

    /// A certificate for `common_name` (and `names`), signed by the CA.
    pub fn issue(&self, common_name: &str, names: &Names) -> Issued {
        let key = ec_key();
        let cert = build(
            common_name,
            names,
            &key,
            Some((&self.ca.cert, &self.ca.key)),
            false,
        );
        let file_tag: String = common_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        write(&format!("{}-{file_tag}", self.tag), cert, key)
    }
}

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("an EC key")).expect("a PKey")
}

/// A certificate valid from yesterday for a year, signed by `issuer` (or
/// by its own key).
fn build(
    common_name: &str,
    names: &Names,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    ca: bool,
) -> X509 {
    let mut subject = X509NameBuilder::new().unwrap();
    subject
        .append_entry_by_nid(Nid::COMMONNAME, common_name)
        .unwrap();
    let subject = subject.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial
        .rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&subject).unwrap();
    b.set_issuer_name(issuer.map_or(&subject, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(365).unwrap())
        .unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
    } else {
        let mut san = SubjectAlternativeName::new();
        let mut any = false;
        for n in names.dns {
            san.dns(n);
            any = true;
        }
        for n in names.uri {
            san.uri(n);
            any = true;
        }
        for n in names.ip {
            san.ip(n);
            any = true;
        }
        if any {
            let ext = san.build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None));
            b.append_extension(ext.unwrap()).unwrap();
        }
    }
    b.sign(issuer.map_or(key, |(_, k)| k), MessageDigest::sha256())
        .unwrap();
    b.build()
}

fn write(tag: &str, cert: X509, key: PKey<Private>) -> Issued {
    let cert_file = TempPath::with_contents(tag, "crt", cert.to_pem().unwrap());
    let key_file = TempPath::with_contents(tag, "key", key.private_key_to_pem_pkcs8().unwrap());
    std::fs::set_permissions(&*key_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 the key");
    Issued {
        cert,
        key,
        cert_file,
        key_file,
    }
}
