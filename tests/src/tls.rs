//! The broker's TLS listener that `scripts/test` sets up (`scripts/lib/tls.sh`):
//! its URL (`AMQPS_URL`) and the test PKI (`REBOUND_TLS_DIR`), as
//! [`TlsBroker`]; [`require_tls`] finds it or says why not.
//!
//! The PKI (generated at test time, see `scripts/lib/tls.sh` for every file): a
//! test CA, the broker's certificate for `localhost`, `127.0.0.1` and `::1`, an
//! expired one the broker presents for the SNI name [`EXPIRED_NAME`], a client
//! certificate whose CN is the broker user [`EXTERNAL_USER`], and a client
//! certificate from a CA the broker does not trust.

use std::path::PathBuf;

use amqp_rebound_core::TlsConfig;

use crate::broker::{BrokerUrl, broker_reachable};

/// The server name for which the broker presents an expired certificate.
pub const EXPIRED_NAME: &str = "expired.rebound.test";

/// The broker user that EXTERNAL authentication with the client certificate
/// logs in as (the certificate's CN).
pub const EXTERNAL_USER: &str = "rebound-tls-client";

/// The broker's TLS listener and the PKI it was set up with.
#[derive(Debug, Clone)]
pub struct TlsBroker {
    /// `AMQPS_URL` (`amqps://guest:guest@localhost:5671/%2f` from scripts/test).
    pub url: BrokerUrl,
    /// `REBOUND_TLS_DIR`: the PEM files.
    pub dir: PathBuf,
}

impl TlsBroker {
    /// The contents of one of the PKI's files (`ca.pem`, `client.key`, ...).
    pub fn pem(&self, file: &str) -> Vec<u8> {
        let path = self.dir.join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Trusts the test CA only.
    pub fn trusting_ca(&self) -> TlsConfig {
        TlsConfig::new()
            .ca_pem(self.pem("ca.pem"))
            .expect("the test CA parses")
    }

    /// Trusts the test CA and presents the client certificate.
    pub fn with_client_certificate(&self) -> TlsConfig {
        self.trusting_ca()
            .client_cert_pem(self.pem("client.pem"), self.pem("client.key"))
            .expect("the client certificate parses")
    }

    /// Trusts the test CA and presents a client certificate from a CA the broker
    /// does not trust.
    pub fn with_rogue_client_certificate(&self) -> TlsConfig {
        self.trusting_ca()
            .client_cert_pem(self.pem("rogue-client.pem"), self.pem("rogue-client.key"))
            .expect("the rogue client certificate parses")
    }

    /// The listener's URL with EXTERNAL authentication and no user name or
    /// password.
    pub fn external_url(&self) -> String {
        BrokerUrl::with_query(
            &format!("amqps://{}{}", self.url.authority(), self.url.path),
            "auth_mechanism=external",
        )
    }
}

/// Whether a missing TLS listener must fail the test: `CI=true`, or
/// `scripts/test` set one up (`REBOUND_TLS_DIR` is set).
pub fn tls_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var_os("REBOUND_TLS_DIR").is_some()
}

/// The TLS listener from `AMQPS_URL` and `REBOUND_TLS_DIR`, reachable. `None`:
/// there is none and none is required, so the caller skips (and says so on
/// stderr). Panics when one is required ([`tls_required`]).
pub fn require_tls(test: &str) -> Option<TlsBroker> {
    let found = (|| {
        let url = std::env::var("AMQPS_URL").map_err(|_| "AMQPS_URL is not set".to_string())?;
        let url = BrokerUrl::parse(&url).map_err(|e| format!("AMQPS_URL: {e}"))?;
        let dir = std::env::var_os("REBOUND_TLS_DIR")
            .map(PathBuf::from)
            .ok_or_else(|| "REBOUND_TLS_DIR is not set".to_string())?;
        if !dir.join("ca.pem").is_file() {
            return Err(format!("no ca.pem in {}", dir.display()));
        }
        if !broker_reachable(&url) {
            return Err(format!("nothing listens at {}", url.authority()));
        }
        Ok(TlsBroker { url, dir })
    })();
    match found {
        Ok(broker) => Some(broker),
        Err(why) if tls_required() => panic!(
            "{test}: no TLS listener ({why}) and CI=true or REBOUND_TLS_DIR is set: \
             a missing TLS setup is a failure, not a skip"
        ),
        Err(why) => {
            eprintln!("SKIPPED {test}: no TLS listener ({why}); scripts/test sets one up");
            None
        }
    }
}
