//! An Envoy `ext_proc` endpoint picker, as the Kubernetes Gateway API
//! Inference Extension defines one.
//!
//! Per request stream:
//! - request headers: answered CONTINUE (no body: immediate 400, a route
//!   needs the body's `model`);
//! - request body (Envoy's `request_body_mode: BUFFERED`; chunks before the
//!   last are answered CONTINUE and buffered, up to
//!   [`MAX_BODY_BYTES`](crate::route::MAX_BODY_BYTES); past it an immediate
//!   413): the OpenAI body
//!   (`model`, `prompt` as text or token ids, or `messages`, and optional
//!   `lora_name`, `cache_salt`) is routed; the answer sets the
//!   `x-gateway-destination-endpoint: host:port` header, clears the route
//!   cache, and sets dynamic metadata `envoy.lb` /
//!   `x-gateway-destination-endpoint`;
//! - a subset hint in the request's metadata context (filter namespace
//!   `envoy.lb.subset_hint`, key `x-gateway-destination-endpoint-subset`, a
//!   list of `host:port`) restricts the choice; no eligible endpoint (or no
//!   worker for the model) is an immediate 503, bad input an immediate 400;
//! - response headers/body/trailers are answered CONTINUE; the end of the
//!   response or of the stream ends the request's in-flight count.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use prost_types::{value::Kind, ListValue, Struct, Value as PValue};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::proto::envoy::config::core::v3 as core;
use super::proto::envoy::r#type::v3 as httptype;
use super::proto::envoy::service::ext_proc::v3 as ep;
use crate::route::{Input, RouteError, RouteRequest, Router, MAX_BODY_BYTES};
use crate::tokenize::ChatOptions;

/// The header naming the chosen endpoint.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// The dynamic metadata namespace of the chosen endpoint.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// The filter metadata namespace of the subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// The key of the subset list in that namespace.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";

/// The `envoy.service.ext_proc.v3.ExternalProcessor` service.
pub struct ExtProcService {
    pub router: Arc<Router>,
}

type ProcessStream = Pin<Box<dyn Stream<Item = Result<ep::ProcessingResponse, Status>> + Send>>;

fn common_continue() -> ep::CommonResponse {
    ep::CommonResponse::default()
}

fn immediate(code: httptype::StatusCode, msg: &str) -> ep::ProcessingResponse {
    ep::ProcessingResponse {
        response: Some(ep::processing_response::Response::ImmediateResponse(
            ep::ImmediateResponse {
                status: Some(httptype::HttpStatus { code: code as i32 }),
                headers: Some(ep::HeaderMutation {
                    set_headers: vec![header("content-type", "application/json")],
                    remove_headers: vec![],
                }),
                body: serde_json::json!({ "error": msg }).to_string().into_bytes(),
                grpc_status: None,
                details: format!("kvrouter: {msg}"),
            },
        )),
        dynamic_metadata: None,
    }
}

fn header(k: &str, v: &str) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: k.to_string(),
            value: String::new(),
            raw_value: v.as_bytes().to_vec(),
        }),
        append_action: core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

fn string_value(s: &str) -> PValue {
    PValue {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// The answer naming `endpoint` (to a request body message).
fn destination(endpoint: &str) -> ep::ProcessingResponse {
    let mut inner = BTreeMap::new();
    inner.insert(DESTINATION_HEADER.to_string(), string_value(endpoint));
    let mut outer = BTreeMap::new();
    outer.insert(
        LB_NAMESPACE.to_string(),
        PValue {
            kind: Some(Kind::StructValue(Struct { fields: inner })),
        },
    );
    ep::ProcessingResponse {
        response: Some(ep::processing_response::Response::RequestBody(
            ep::BodyResponse {
                response: Some(ep::CommonResponse {
                    status: ep::common_response::ResponseStatus::Continue as i32,
                    header_mutation: Some(ep::HeaderMutation {
                        set_headers: vec![header(DESTINATION_HEADER, endpoint)],
                        remove_headers: vec![],
                    }),
                    body_mutation: None,
                    clear_route_cache: true,
                }),
            },
        )),
        dynamic_metadata: Some(Struct { fields: outer }),
    }
}

/// The subset hint of a metadata context, if any.
pub fn subset_hint(md: &core::Metadata) -> Option<Vec<String>> {
    let ns = md.filter_metadata.get(SUBSET_NAMESPACE)?;
    let v = ns.fields.get(SUBSET_KEY)?;
    let list: Vec<String> = match &v.kind {
        Some(Kind::ListValue(ListValue { values })) => values
            .iter()
            .filter_map(|x| match &x.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        Some(Kind::StringValue(s)) => s.split(',').map(|x| x.trim().to_string()).collect(),
        _ => Vec::new(),
    };
    Some(list)
}

/// The route request of an OpenAI-style body.
pub fn parse_body(body: &[u8], subset: Option<Vec<String>>) -> Result<RouteRequest, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not JSON: {e}"))?;
    let model = v
        .get("model")
        .and_then(|m| m.as_str())
        .ok_or("request body needs a string \"model\"")?
        .to_string();
    let input = if let Some(m) = v.get("messages") {
        let list = m.as_array().ok_or("\"messages\" must be an array")?;
        Input::Messages(list.clone(), ChatOptions::from_body(&v)?)
    } else if let Some(p) = v.get("prompt") {
        match p {
            serde_json::Value::String(s) => Input::Prompt(s.clone()),
            serde_json::Value::Array(a) if a.iter().all(|x| x.is_u64()) => Input::Tokens(
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| u32::try_from(x).map_err(|_| "token id out of range".to_string()))
                    .collect::<Result<_, _>>()?,
            ),
            serde_json::Value::Array(a) if a.iter().all(|x| x.is_string()) => Input::Prompt(
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(""),
            ),
            _ => return Err("\"prompt\" must be a string or a list of token ids".into()),
        }
    } else if let Some(t) = v.get("token_ids") {
        let ids: Vec<u32> = serde_json::from_value(t.clone())
            .map_err(|e| format!("\"token_ids\" must be a list of token ids: {e}"))?;
        Input::Tokens(ids)
    } else {
        return Err("request body needs \"messages\", \"prompt\" or \"token_ids\"".into());
    };
    let opt = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    Ok(RouteRequest {
        model,
        input,
        lora_name: opt("lora_name"),
        cache_salt: opt("cache_salt"),
        subset,
    })
}

/// One request stream's state.
#[derive(Default)]
struct StreamState {
    body: Vec<u8>,
    subset: Option<Vec<String>>,
    routed: Option<u64>,
}

impl ExtProcService {
    async fn handle(
        &self,
        st: &mut StreamState,
        m: ep::ProcessingRequest,
    ) -> Option<ep::ProcessingResponse> {
        use ep::processing_request::Request as R;
        use ep::processing_response::Response as A;
        if let Some(md) = &m.metadata_context {
            if let Some(s) = subset_hint(md) {
                st.subset = Some(s);
            }
        }
        let resp = match m.request? {
            R::RequestHeaders(h) => {
                if h.end_of_stream {
                    immediate(
                        httptype::StatusCode::BadRequest,
                        "a request body with a model is required",
                    )
                } else {
                    ep::ProcessingResponse {
                        response: Some(A::RequestHeaders(ep::HeadersResponse {
                            response: Some(common_continue()),
                        })),
                        dynamic_metadata: None,
                    }
                }
            }
            R::RequestBody(b) => {
                if st.body.len().saturating_add(b.body.len()) > MAX_BODY_BYTES {
                    return Some(immediate(
                        httptype::StatusCode::PayloadTooLarge,
                        &format!("request body exceeds {MAX_BODY_BYTES} bytes"),
                    ));
                }
                st.body.extend_from_slice(&b.body);
                if !b.end_of_stream {
                    ep::ProcessingResponse {
                        response: Some(A::RequestBody(ep::BodyResponse {
                            response: Some(common_continue()),
                        })),
                        dynamic_metadata: None,
                    }
                } else {
                    let body = std::mem::take(&mut st.body);
                    match parse_body(&body, st.subset.clone()) {
                        Err(e) => immediate(httptype::StatusCode::BadRequest, &e),
                        Ok(req) => {
                            let router = self.router.clone();
                            let res = tokio::task::spawn_blocking(move || router.route(&req))
                                .await
                                .unwrap_or_else(|e| Err(RouteError::Setup(e.to_string())));
                            match res {
                                Ok(d) => {
                                    st.routed = Some(d.request_id);
                                    let hp = self
                                        .router
                                        .workers
                                        .get(&d.worker_id)
                                        .map(|w| w.spec.host_port().to_string())
                                        .unwrap_or(d.endpoint);
                                    destination(&hp)
                                }
                                Err(e @ RouteError::Invalid(_)) => {
                                    immediate(httptype::StatusCode::BadRequest, &e.to_string())
                                }
                                Err(e @ RouteError::Setup(_)) => immediate(
                                    httptype::StatusCode::InternalServerError,
                                    &e.to_string(),
                                ),
                                Err(e) => immediate(
                                    httptype::StatusCode::ServiceUnavailable,
                                    &e.to_string(),
                                ),
                            }
                        }
                    }
                }
            }
            R::RequestTrailers(_) => ep::ProcessingResponse {
                response: Some(A::RequestTrailers(ep::TrailersResponse::default())),
                dynamic_metadata: None,
            },
            R::ResponseHeaders(h) => {
                if h.end_of_stream {
                    self.finish(st);
                }
                ep::ProcessingResponse {
                    response: Some(A::ResponseHeaders(ep::HeadersResponse {
                        response: Some(common_continue()),
                    })),
                    dynamic_metadata: None,
                }
            }
            R::ResponseBody(b) => {
                if b.end_of_stream {
                    self.finish(st);
                }
                ep::ProcessingResponse {
                    response: Some(A::ResponseBody(ep::BodyResponse {
                        response: Some(common_continue()),
                    })),
                    dynamic_metadata: None,
                }
            }
            R::ResponseTrailers(_) => {
                self.finish(st);
                ep::ProcessingResponse {
                    response: Some(A::ResponseTrailers(ep::TrailersResponse::default())),
                    dynamic_metadata: None,
                }
            }
        };
        if m.observability_mode {
            return None;
        }
        Some(resp)
    }

    fn finish(&self, st: &mut StreamState) {
        if let Some(id) = st.routed.take() {
            self.router.done(id);
        }
    }
}

#[tonic::async_trait]
impl ep::external_processor_server::ExternalProcessor for Arc<ExtProcService> {
    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        req: Request<Streaming<ep::ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let svc = self.clone();
        tokio::spawn(async move {
            let mut st = StreamState::default();
            while let Some(msg) = inbound.next().await {
                let Ok(m) = msg else { break };
                if let Some(resp) = svc.handle(&mut st, m).await {
                    if tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
            }
            svc.finish(&mut st);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        let r = parse_body(br#"{"model": "m", "prompt": [1, 2]}"#, None);
        assert_eq!(r.map(|r| r.input).ok(), Some(Input::Tokens(vec![1, 2])));
        let r = parse_body(
            br#"{"model": "m", "messages": [], "cache_salt": "s"}"#,
            None,
        );
        assert_eq!(r.ok().and_then(|r| r.cache_salt), Some("s".to_string()));
        assert!(parse_body(b"{", None).is_err());
        assert!(parse_body(br#"{"model": 1, "prompt": "x"}"#, None).is_err());
        assert!(parse_body(br#"{"model": "m"}"#, None).is_err());
        assert!(parse_body(br#"{"model": "m", "prompt": [-1]}"#, None).is_err());
        assert!(parse_body(br#"{"model": "m", "prompt": [99999999999]}"#, None).is_err());
    }

    #[test]
    fn subset_from_metadata() {
        let mut ns = BTreeMap::new();
        ns.insert(
            SUBSET_KEY.to_string(),
            PValue {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![string_value("a:1"), string_value("b:2")],
                })),
            },
        );
        let mut md = core::Metadata::default();
        md.filter_metadata
            .insert(SUBSET_NAMESPACE.to_string(), Struct { fields: ns });
        assert_eq!(
            subset_hint(&md),
            Some(vec!["a:1".to_string(), "b:2".to_string()])
        );
        assert_eq!(subset_hint(&core::Metadata::default()), None);
    }
}
