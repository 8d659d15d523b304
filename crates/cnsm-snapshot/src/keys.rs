//! ECDSA P-256 keys (ring): PKCS#8 private keys and SubjectPublicKeyInfo public keys, both as
//! PEM, and the Sigstore key hint (hex SHA-256 of the DER SPKI, as RFC 6962 derives key ids).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use sha2::{Digest, Sha256};

/// Why a key could not be made, read or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("not a PEM {label} block: {detail}")]
    Pem { label: &'static str, detail: String },
    #[error("not an ECDSA P-256 {what}: {detail}")]
    Key { what: &'static str, detail: String },
    #[error("signing failed")]
    Sign,
}

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1), before the
/// 65-byte uncompressed point.
const SPKI_P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

const PRIVATE_LABEL: &str = "PRIVATE KEY";
const PUBLIC_LABEL: &str = "PUBLIC KEY";

/// A signing key (ECDSA P-256, SHA-256, ASN.1/DER signatures).
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("hint", &self.public_key().hint())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).map_err(|_| {
                KeyError::Key {
                    what: "key",
                    detail: "the random generator failed".into(),
                }
            })?;
        SigningKey::from_pkcs8(pkcs8.as_ref())
    }

    /// Reads a PKCS#8 DER private key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, KeyError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &SystemRandom::new())
                .map_err(|e| KeyError::Key {
                    what: "private key (PKCS#8)",
                    detail: e.to_string(),
                })?;
        Ok(SigningKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// Reads a `-----BEGIN PRIVATE KEY-----` (PKCS#8) PEM file's text.
    pub fn from_pem(text: &str) -> Result<SigningKey, KeyError> {
        SigningKey::from_pkcs8(&pem_decode(PRIVATE_LABEL, text)?)
    }

    /// The PKCS#8 PEM text.
    pub fn to_pem(&self) -> String {
        pem_encode(PRIVATE_LABEL, &self.pkcs8)
    }

    pub fn public_key(&self) -> PublicKey {
        let mut spki = SPKI_P256_PREFIX.to_vec();
        spki.extend_from_slice(self.pair.public_key().as_ref());
        PublicKey { spki }
    }

    /// An ECDSA P-256 / SHA-256 signature (ASN.1 DER) of the message whose SHA-256 is
    /// `digest`: the same signature in meaning as [`SigningKey::sign`] over the message itself
    /// (ECDSA signs the hash), so a payload can be signed while it streams past.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
        use p256::ecdsa::signature::hazmat::PrehashSigner;
        use p256::pkcs8::DecodePrivateKey;
        let key =
            p256::ecdsa::SigningKey::from_pkcs8_der(&self.pkcs8).map_err(|_| KeyError::Sign)?;
        let signature: p256::ecdsa::Signature =
            key.sign_prehash(digest).map_err(|_| KeyError::Sign)?;
        Ok(signature.to_der().as_bytes().to_vec())
    }

    /// An ECDSA P-256 / SHA-256 signature of `message`, ASN.1 DER.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.pair
            .sign(&SystemRandom::new(), message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| KeyError::Sign)
    }
}

/// A P-256 public key (DER SubjectPublicKeyInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki: Vec<u8>,
}

impl PublicKey {
    /// Reads a DER SubjectPublicKeyInfo of a P-256 key (uncompressed point).
    pub fn from_spki(spki: &[u8]) -> Result<PublicKey, KeyError> {
        let fail = |detail: &str| KeyError::Key {
            what: "public key (SubjectPublicKeyInfo)",
            detail: detail.into(),
        };
        if spki.len() != SPKI_P256_PREFIX.len() + 65
            || spki[..SPKI_P256_PREFIX.len()] != SPKI_P256_PREFIX
        {
            return Err(fail("expected a named-curve prime256v1 key"));
        }
        if spki[SPKI_P256_PREFIX.len()] != 0x04 {
            return Err(fail("expected an uncompressed point"));
        }
        Ok(PublicKey {
            spki: spki.to_vec(),
        })
    }

    /// Reads a `-----BEGIN PUBLIC KEY-----` PEM file's text.
    pub fn from_pem(text: &str) -> Result<PublicKey, KeyError> {
        PublicKey::from_spki(&pem_decode(PUBLIC_LABEL, text)?)
    }

    pub fn to_pem(&self) -> String {
        pem_encode(PUBLIC_LABEL, &self.spki)
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The Sigstore `publicKey.hint`: lowercase hex SHA-256 of the DER SPKI.
    pub fn hint(&self) -> String {
        Sha256::digest(&self.spki)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Checks an ASN.1 DER ECDSA P-256 / SHA-256 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let point = &self.spki[SPKI_P256_PREFIX.len()..];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(message, signature)
            .is_ok()
    }
}

impl PublicKey {
    /// Checks an ASN.1 DER ECDSA P-256 / SHA-256 signature over the message whose SHA-256 is
    /// `digest` (as [`PublicKey::verify`] does over the message itself).
    pub fn verify_digest(&self, digest: &[u8; 32], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let point = &self.spki[SPKI_P256_PREFIX.len()..];
        let Ok(key) = p256::ecdsa::VerifyingKey::from_sec1_bytes(point) else {
            return false;
        };
        let Ok(signature) = p256::ecdsa::Signature::from_der(signature) else {
            return false;
        };
        key.verify_prehash(digest, &signature).is_ok()
    }
}

/// PEM text (RFC 7468): the label's BEGIN line, base64 in 64-column lines, the END line.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block labelled `label` (text around it is ignored).
pub fn pem_decode(label: &'static str, text: &str) -> Result<Vec<u8>, KeyError> {
    let fail = |detail: String| KeyError::Pem { label, detail };
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| fail(format!("no {begin} line")))?
        + begin.len();
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| fail(format!("no {end} line")))?
        + start;
    let body: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD
        .decode(body.as_bytes())
        .map_err(|e| fail(format!("bad base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_sign() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&key.to_pem()).unwrap();
        let public = PublicKey::from_pem(&again.public_key().to_pem()).unwrap();
        assert_eq!(public, key.public_key());
        assert_eq!(public.hint().len(), 64);
        let signature = key.sign(b"payload").unwrap();
        assert!(public.verify(b"payload", &signature));
        assert!(!public.verify(b"payloaD", &signature));
        let other = SigningKey::generate().unwrap().public_key();
        assert!(!other.verify(b"payload", &signature));
    }

    #[test]
    fn digest_signatures_mean_the_same_as_message_signatures() {
        let key = SigningKey::generate().unwrap();
        let public = key.public_key();
        let digest: [u8; 32] = Sha256::digest(b"payload").into();
        let by_digest = key.sign_digest(&digest).unwrap();
        assert!(
            public.verify(b"payload", &by_digest),
            "ring accepts a pre-hash signature"
        );
        assert!(!public.verify(b"payloaD", &by_digest));
        let by_message = key.sign(b"payload").unwrap();
        assert!(public.verify_digest(&digest, &by_message));
        let other: [u8; 32] = Sha256::digest(b"payloaD").into();
        assert!(!public.verify_digest(&other, &by_message));
        let stranger = SigningKey::generate().unwrap().public_key();
        assert!(!stranger.verify_digest(&digest, &by_digest));
        assert!(!public.verify_digest(&digest, b"not DER"));
    }

    #[test]
    fn refuses_bad_pem_and_wrong_key_kinds() {
        assert!(matches!(
            PublicKey::from_pem("nothing here"),
            Err(KeyError::Pem { .. })
        ));
        let bad = pem_encode("PUBLIC KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            PublicKey::from_pem(&bad),
            Err(KeyError::Key { .. })
        ));
        let private = SigningKey::generate().unwrap().to_pem();
        assert!(matches!(
            PublicKey::from_pem(&private),
            Err(KeyError::Pem { .. })
        ));
    }
}
