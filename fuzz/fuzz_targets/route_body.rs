//! Route request bodies as kvrouter's HTTP API (`POST /v1/route`) and its
//! Envoy ext_proc endpoint picker parse them: any bytes, never a panic. A
//! body both accept names the same model, and chat options only with
//! messages.
#![no_main]

use kvrouter::api::ext_proc::parse_body;
use kvrouter::api::http::RouteBody;
use kvrouter::route::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let picked = parse_body(data, None);
    let http = serde_json::from_slice::<RouteBody>(data)
        .map_err(|e| e.to_string())
        .and_then(RouteBody::into_request);
    if let (Ok(a), Ok(b)) = (&picked, &http) {
        assert_eq!(a.model, b.model);
    }
    for r in [picked.ok(), http.ok()].into_iter().flatten() {
        if let Input::Messages(_, options) = &r.input {
            assert!(options.tools.as_ref().is_none_or(|t| t.is_array()));
        }
    }
});
