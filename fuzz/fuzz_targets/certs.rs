//! Certificates and revocation lists as the coordinator reads them: a peer's DER certificate
//! (its Fedge identity, its serial and end of validity) and the CRL file (PEM) it reloads while
//! running. Never a panic; an identity that parses names a role and a valid id.
#![no_main]

use fedge_coordinator::certs::identity_of;
use fedge_coordinator::listener::{certificate_validity, revoked_serials};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(identity) = identity_of(data) {
        assert!(!identity.id.is_empty());
    }
    let _ = certificate_validity(data);
    let _ = revoked_serials(data);
});
