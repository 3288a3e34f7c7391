//! The frame ceiling of the wire format (dsplane-proto) and the configuration's ceiling on
//! `payload_bytes_max` (dsplane-core) are one number: a configuration may never allow a payload
//! the decoder refuses.

use dsplane_core::wire::PAYLOAD_BYTES_MAX_CEILING;

#[test]
fn wire_ceiling_matches_config_ceiling() {
    assert_eq!(
        PAYLOAD_BYTES_MAX_CEILING,
        dsplane_core::config::PAYLOAD_BYTES_CEILING
    );
}
