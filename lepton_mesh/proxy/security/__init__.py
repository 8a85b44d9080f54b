"""Who may call: mTLS between sidecars, TLS contexts, JWT authentication, authorization and rate limits on the inbound side."""
