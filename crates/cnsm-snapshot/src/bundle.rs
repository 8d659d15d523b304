//! The Sigstore bundle v0.3 (`application/vnd.dev.sigstore.bundle.v0.3+json`) in its
//! "self-managed key" form: a `messageSignature` (SHA-256 digest of the payload, ECDSA P-256
//! signature over the payload, both base64) and `verificationMaterial.publicKey.hint`, with no
//! transparency-log entries and no timestamps. A standard verifier (`@sigstore/verify` with its
//! thresholds at 0) accepts it against the public key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::keys::{KeyError, SigningKey};

/// The media type of the bundles cnsm writes and reads.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// Largest bundle JSON accepted (a bundle of this form is well under 1 KiB).
pub const BUNDLE_LEN_MAX: usize = 64 * 1024;

/// A parsed bundle: what verification needs from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub hint: String,
    pub digest: [u8; 32],
    pub signature: Vec<u8>,
}

/// Signs `payload` and returns the bundle as compact JSON (one line).
pub fn sign(key: &SigningKey, payload: &[u8]) -> Result<String, KeyError> {
    sign_digest(key, &Sha256::digest(payload).into())
}

/// [`sign`] for a payload whose SHA-256 was computed while it streamed.
pub fn sign_digest(key: &SigningKey, digest: &[u8; 32]) -> Result<String, KeyError> {
    let signature = key.sign_digest(digest)?;
    Ok(bundle_json(&key.public_key().hint(), digest, &signature))
}

/// The compact JSON of a bundle.
fn bundle_json(hint: &str, digest: &[u8; 32], signature: &[u8]) -> String {
    let bundle = json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": hint},
            "tlogEntries": [],
        },
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": STANDARD.encode(digest)},
            "signature": STANDARD.encode(signature),
        },
    });
    bundle.to_string()
}

/// The longest bundle [`sign_digest`] writes: a key hint is 64 hex digits and an ASN.1 DER
/// ECDSA P-256 signature at most 72 bytes. A one-file export reserves this much room for the
/// bundle line before the payload it streams ([`crate::files::SignedOutput`]).
pub fn signed_bundle_len_max() -> usize {
    bundle_json(&"0".repeat(64), &[0; 32], &[0; 72]).len()
}

/// Parses and checks the structure of a bundle: media type, a public-key hint, no
/// certificate, a `messageSignature` with a SHA2_256 digest of 32 bytes and a signature.
pub fn parse(text: &[u8]) -> Result<Bundle, String> {
    if text.len() > BUNDLE_LEN_MAX {
        return Err(format!("bundle is larger than {BUNDLE_LEN_MAX} bytes"));
    }
    let value: Value =
        serde_json::from_slice(text).map_err(|e| format!("bundle is not JSON: {e}"))?;
    // Only the members of this bundle form are accepted, so no byte of it goes unchecked.
    only_keys(
        &value,
        "bundle",
        &["mediaType", "verificationMaterial", "messageSignature"],
    )?;
    let media_type = value.get("mediaType").and_then(Value::as_str);
    if media_type != Some(BUNDLE_MEDIA_TYPE) {
        return Err(format!(
            "media type is {}, expected {BUNDLE_MEDIA_TYPE}",
            media_type.map_or("missing".into(), |m| format!("{m:?}"))
        ));
    }
    let material = value
        .get("verificationMaterial")
        .ok_or("verificationMaterial is missing")?;
    if material.get("certificate").is_some() || material.get("x509CertificateChain").is_some() {
        return Err(
            "verificationMaterial carries a certificate; cnsm expects a public-key hint".into(),
        );
    }
    only_keys(
        material,
        "verificationMaterial",
        &["publicKey", "tlogEntries", "timestampVerificationData"],
    )?;
    if let Some(public_key) = material.get("publicKey") {
        only_keys(public_key, "verificationMaterial.publicKey", &["hint"])?;
    }
    let hint = material
        .pointer("/publicKey/hint")
        .and_then(Value::as_str)
        .ok_or("verificationMaterial.publicKey.hint is missing")?
        .to_owned();
    if !material.get("tlogEntries").is_some_and(Value::is_array) {
        return Err("verificationMaterial.tlogEntries is missing or not an array".into());
    }
    if value.get("dsseEnvelope").is_some() {
        return Err("bundle holds a dsseEnvelope; cnsm expects a messageSignature".into());
    }
    let signature = value
        .get("messageSignature")
        .ok_or("messageSignature is missing")?;
    only_keys(
        signature,
        "messageSignature",
        &["messageDigest", "signature"],
    )?;
    if let Some(digest) = signature.get("messageDigest") {
        only_keys(
            digest,
            "messageSignature.messageDigest",
            &["algorithm", "digest"],
        )?;
    }
    let algorithm = signature
        .pointer("/messageDigest/algorithm")
        .and_then(Value::as_str);
    if algorithm != Some("SHA2_256") {
        return Err(format!(
            "messageDigest.algorithm is {algorithm:?}, expected \"SHA2_256\""
        ));
    }
    let digest = base64_field(
        signature.pointer("/messageDigest/digest"),
        "messageDigest.digest",
    )?;
    let digest: [u8; 32] = digest
        .try_into()
        .map_err(|_| "messageDigest.digest is not 32 bytes".to_owned())?;
    let signature = base64_field(signature.get("signature"), "messageSignature.signature")?;
    if signature.is_empty() {
        return Err("messageSignature.signature is empty".into());
    }
    Ok(Bundle {
        hint,
        digest,
        signature,
    })
}

fn only_keys(value: &Value, what: &str, allowed: &[&str]) -> Result<(), String> {
    let object = value
        .as_object()
        .ok_or_else(|| format!("{what} is not an object"))?;
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(format!("{what} has an unexpected member {key:?}")),
        None => Ok(()),
    }
}

fn base64_field(value: Option<&Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = value
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{name} is missing"))?;
    STANDARD
        .decode(text)
        .map_err(|e| format!("{name} is not base64: {e}"))
}
