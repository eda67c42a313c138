//! The password scrambles of MySQL's two common authentication plugins, and the RSA public-key
//! exchange `caching_sha2_password` uses without TLS (RSA-OAEP with SHA-1, as the server decrypts it).
//!
//! ring (already linked through rustls) gives SHA-1, SHA-256 and random bytes, but no RSA encryption:
//! the one modular exponentiation an encryption needs is done here, on plain limbs (not constant
//! time; it encrypts with a public key, so there is no private value to leak).

use ring::digest::{Context, SHA1_FOR_LEGACY_USE_ONLY as SHA1, SHA256, digest};

pub const NATIVE: &str = "mysql_native_password";
pub const CACHING_SHA2: &str = "caching_sha2_password";

/// The first authentication response for `plugin`, or `None` for a plugin this client does not speak.
/// An empty password is an empty response, for both plugins.
#[must_use]
pub fn respond(plugin: &str, password: &[u8], scramble: &[u8]) -> Option<Vec<u8>> {
    if password.is_empty() && (plugin == NATIVE || plugin == CACHING_SHA2) {
        return Some(Vec::new());
    }
    match plugin {
        NATIVE => Some(native(password, scramble)),
        CACHING_SHA2 => Some(caching_sha2(password, scramble)),
        _ => None,
    }
}

/// `SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password)))`.
fn native(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    let stage1 = digest(&SHA1, password);
    let stage2 = digest(&SHA1, stage1.as_ref());
    let mut ctx = Context::new(&SHA1);
    ctx.update(scramble);
    ctx.update(stage2.as_ref());
    xor(stage1.as_ref(), ctx.finish().as_ref())
}

/// `SHA256(password) XOR SHA256(SHA256(SHA256(password)) + scramble)`.
fn caching_sha2(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    let stage1 = digest(&SHA256, password);
    let stage2 = digest(&SHA256, stage1.as_ref());
    let mut ctx = Context::new(&SHA256);
    ctx.update(stage2.as_ref());
    ctx.update(scramble);
    xor(stage1.as_ref(), ctx.finish().as_ref())
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// The password for `caching_sha2_password`'s full authentication without TLS: `password + NUL`,
/// then `XOR` with the scramble (repeated), encrypted with the server's RSA public key (PEM) under OAEP.
pub fn encrypt_password(password: &[u8], scramble: &[u8], pem: &[u8]) -> Result<Vec<u8>, String> {
    if scramble.is_empty() {
        return Err("no scramble for the RSA key exchange".into());
    }
    let mut message = password.to_vec();
    message.push(0);
    for (i, b) in message.iter_mut().enumerate() {
        *b ^= scramble[i % scramble.len()];
    }
    let (n, e) = public_key(pem)?;
    let mut seed = [0u8; 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| "no random bytes for the RSA key exchange".to_owned())?;
    oaep_encrypt(&n, &e, &message, &seed)
}

/// RSAES-OAEP (RFC 8017 7.1.1) with SHA-1 and MGF1-SHA-1, an empty label, and the given seed.
fn oaep_encrypt(n: &[u8], e: &[u8], message: &[u8], seed: &[u8; 20]) -> Result<Vec<u8>, String> {
    let k = n.len();
    if message.len() + 2 * 20 + 2 > k {
        return Err("the password is too long for the server's RSA key".into());
    }
    let mut db = digest(&SHA1, b"").as_ref().to_vec();
    // DB = lHash || PS (zeros) || 0x01 || M, k - 21 bytes long.
    db.resize(k - 21 - 1 - message.len(), 0);
    db.push(1);
    db.extend_from_slice(message);
    for (b, m) in db.iter_mut().zip(mgf1(seed, k - 21)) {
        *b ^= m;
    }
    let mut masked_seed = seed.to_vec();
    for (b, m) in masked_seed.iter_mut().zip(mgf1(&db, 20)) {
        *b ^= m;
    }
    let mut em = vec![0u8];
    em.extend_from_slice(&masked_seed);
    em.extend_from_slice(&db);
    Ok(mod_pow(&em, e, n))
}

fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 20);
    let mut counter = 0u32;
    while out.len() < len {
        let mut ctx = Context::new(&SHA1);
        ctx.update(seed);
        ctx.update(&counter.to_be_bytes());
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// The modulus and exponent (big-endian, without leading zeros) of a PEM `PUBLIC KEY`
/// (`SubjectPublicKeyInfo`) or `RSA PUBLIC KEY` (PKCS#1).
fn public_key(pem: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let bad = || "the server's RSA public key cannot be read".to_owned();
    let text = std::str::from_utf8(pem).map_err(|_| bad())?;
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(str::chars)
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64(&body).ok_or_else(bad)?;
    let (outer, _) = der_item(&der, 0x30).ok_or_else(bad)?;
    // SubjectPublicKeyInfo: SEQUENCE { AlgorithmIdentifier, BIT STRING { RSAPublicKey } }.
    let rsa = match der_item(outer, 0x30) {
        Some((_, rest)) if rest.first() == Some(&0x03) => {
            let (bits, _) = der_item(rest, 0x03).ok_or_else(bad)?;
            let (inner, _) = der_item(bits.get(1..).ok_or_else(bad)?, 0x30).ok_or_else(bad)?;
            inner
        }
        _ => outer,
    };
    let (n, rest) = der_item(rsa, 0x02).ok_or_else(bad)?;
    let (e, _) = der_item(rest, 0x02).ok_or_else(bad)?;
    let strip = |v: &[u8]| {
        v.iter()
            .skip_while(|b| **b == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    let (n, e) = (strip(n), strip(e));
    if n.len() < 64 || e.is_empty() {
        return Err(bad());
    }
    Ok((n, e))
}

/// One DER item with `tag` at the start of `input`: its contents and what follows.
fn der_item(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)?;
    let (len, start) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = input
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((input.get(start..end)?, input.get(end..)?))
}

fn base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// `base ^ exp mod n`, all big-endian bytes; the result has `n`'s length.
fn mod_pow(base: &[u8], exp: &[u8], n: &[u8]) -> Vec<u8> {
    let n = limbs(n);
    let base = limbs(base);
    let mut result = vec![0u64; n.len()];
    result[0] = 1;
    let base = base_reduced(&base, &n);
    for byte in exp {
        for bit in (0..8).rev() {
            result = mod_mul(&result, &result, &n);
            if byte >> bit & 1 == 1 {
                result = mod_mul(&result, &base, &n);
            }
        }
    }
    let mut out: Vec<u8> = result.iter().rev().flat_map(|l| l.to_be_bytes()).collect();
    let len = n.len() * 8 - n_bytes_unused(&n);
    out.drain(..out.len() - len);
    out
}

fn n_bytes_unused(n: &[u64]) -> usize {
    (n.last().copied().unwrap_or(0).leading_zeros() / 8) as usize
}

/// Little-endian 64-bit limbs of big-endian bytes.
fn limbs(bytes: &[u8]) -> Vec<u64> {
    bytes
        .rchunks(8)
        .map(|c| c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        .collect()
}

/// `x mod n` for an `x` of any length, by shifting its bits in one at a time.
fn base_reduced(x: &[u64], n: &[u64]) -> Vec<u64> {
    let mut r = vec![0u64; n.len()];
    for limb in x.iter().rev() {
        for bit in (0..64).rev() {
            double_mod(&mut r, n);
            if limb >> bit & 1 == 1 {
                add_small_mod(&mut r, n);
            }
        }
    }
    r
}

/// `a * b mod n` (`a`, `b` < `n`), by double-and-add over the bits of `b`.
fn mod_mul(a: &[u64], b: &[u64], n: &[u64]) -> Vec<u64> {
    let mut r = vec![0u64; n.len()];
    for limb in b.iter().rev() {
        for bit in (0..64).rev() {
            double_mod(&mut r, n);
            if limb >> bit & 1 == 1 {
                add_mod(&mut r, a, n);
            }
        }
    }
    r
}

/// `r = 2r mod n`.
fn double_mod(r: &mut [u64], n: &[u64]) {
    let mut carry = 0u64;
    for limb in r.iter_mut() {
        let next = *limb >> 63;
        *limb = (*limb << 1) | carry;
        carry = next;
    }
    if carry == 1 || !less(r, n) {
        sub(r, n);
    }
}

/// `r = r + 1 mod n`.
fn add_small_mod(r: &mut [u64], n: &[u64]) {
    let mut one = vec![0u64; r.len()];
    one[0] = 1;
    add_mod(r, &one, n);
}

/// `r = r + a mod n` (`r`, `a` < `n`).
fn add_mod(r: &mut [u64], a: &[u64], n: &[u64]) {
    let mut carry = 0u128;
    for (x, y) in r.iter_mut().zip(a.iter().chain(std::iter::repeat(&0))) {
        let sum = u128::from(*x) + u128::from(*y) + carry;
        *x = sum as u64;
        carry = sum >> 64;
    }
    if carry == 1 || !less(r, n) {
        sub(r, n);
    }
}

fn less(a: &[u64], b: &[u64]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x < y;
        }
    }
    false
}

/// `r = r - n`, wrapping (a carry out of `r` before this makes it right).
fn sub(r: &mut [u64], n: &[u64]) {
    let mut borrow = 0u64;
    for (x, y) in r.iter_mut().zip(n) {
        let (d1, b1) = x.overflowing_sub(*y);
        let (d2, b2) = d1.overflowing_sub(borrow);
        *x = d2;
        borrow = u64::from(b1 || b2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Vectors computed with Python's hashlib from the formulas in MySQL's documentation.
    #[test]
    fn scrambles_match_known_vectors() {
        let scramble = b"abcdefghijklmnopqrst";
        assert_eq!(
            hex(&respond(NATIVE, b"secret", scramble).unwrap()),
            NATIVE_VECTOR
        );
        assert_eq!(
            hex(&respond(CACHING_SHA2, b"secret", scramble).unwrap()),
            SHA2_VECTOR
        );
        // An empty password is an empty response for both plugins (a surviving mutant showed the
        // native one untested).
        assert!(respond(CACHING_SHA2, b"", scramble).unwrap().is_empty());
        assert!(respond(NATIVE, b"", scramble).unwrap().is_empty());
        assert!(respond("auth_gssapi_client", b"x", scramble).is_none());
    }

    const NATIVE_VECTOR: &str = "8817c50fa779daef010ee7577825b0847df9842e";
    const SHA2_VECTOR: &str = "c76e2898612a4cf042c77fa8c4702c4c64c0c2c557c53c4d75595aaa6abae809";

    #[test]
    fn mod_pow_is_right_on_small_numbers() {
        // 4^13 mod 497 = 445 (the textbook example), with a modulus of two limbs as well.
        assert_eq!(mod_pow(&[4], &[13], &[0x01, 0xf1]), vec![0x01, 0xbd]);
        let n = 0xffff_ffff_ffff_ffc5_u128; // a 64-bit prime
        let n_bytes: Vec<u8> = (n as u64).to_be_bytes().to_vec();
        let got = mod_pow(&[3], &[0x01, 0x00, 0x01], &n_bytes);
        let mut expected = 1u128;
        for _ in 0..65537 {
            expected = expected * 3 % n;
        }
        assert_eq!(got, (expected as u64).to_be_bytes().to_vec());
    }

    /// Encrypts under a key made by openssl and decrypts with openssl: the server's side of OAEP.
    #[test]
    fn openssl_decrypts_what_is_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let public = dir.path().join("public.pem");
        let ran = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output();
        let Ok(out) = ran else {
            assert!(
                std::env::var_os("CI").is_none(),
                "openssl is needed under CI"
            );
            return;
        };
        assert!(out.status.success());
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success());
        let pem = std::fs::read(&public).unwrap();
        let scramble = b"abcdefghijklmnopqrst";
        let encrypted = encrypt_password(b"pass/?#@word", scramble, &pem).unwrap();
        assert_eq!(encrypted.len(), 256);
        let cipher = dir.path().join("cipher");
        std::fs::write(&cipher, &encrypted).unwrap();
        let out = std::process::Command::new("openssl")
            .args([
                "pkeyutl",
                "-decrypt",
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-inkey",
            ])
            .arg(&key)
            .arg("-in")
            .arg(&cipher)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut plain = out.stdout;
        for (i, b) in plain.iter_mut().enumerate() {
            *b ^= scramble[i % scramble.len()];
        }
        assert_eq!(plain, b"pass/?#@word\0");
    }
}
