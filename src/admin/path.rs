//! The API's paths, as the responses that point at a key write them.

/// The path of the key with this id, `/v1/api-keys/{id}`: characters outside the
/// unreserved set percent-encoded.
pub(crate) fn key(id: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    format!(
        "/v1/api-keys/{}",
        percent_encoding::utf8_percent_encode(id, RESERVED)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_id_is_one_path_segment() {
        assert_eq!(super::key("ci-2024_a.b~c"), "/v1/api-keys/ci-2024_a.b~c");
        assert_eq!(super::key("a/b?c#d"), "/v1/api-keys/a%2Fb%3Fc%23d");
        assert_eq!(
            super::key("clé o'brien"),
            "/v1/api-keys/cl%C3%A9%20o%27brien"
        );
    }
}
