//! Outbound HTTP from a Rust plugin, through `wasi:http` (the `wasip2`
//! crate's bindings): GETs the URL in each message's payload and publishes
//! the response body, with its status in the `status` header.
//!
//! The host sends a request only to the origins the plugin's config grants
//! (`allowed_outbound_hosts`); any other fails here with
//! `HttpRequestDenied`. A failed request rejects the message with the
//! error, so it is dead-lettered with the reason.
//!
//! Config: `output` — the topic to publish to (default `fetched`);
//! `follow_redirects` — `true` to follow up to five redirects (each one a
//! new request the host checks), else a redirect is published as it came.

use std::io::Read;

use sluice_sdk::prelude::*;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingRequest, Scheme};

fn fetch(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let mut url = String::from_utf8(msg.payload).map_err(|_| Failure::reject("no URL"))?;
    let follow = config_get("follow_redirects").as_deref() == Some("true");
    let mut hops = 0;
    let (status, body) = loop {
        let (status, location, body) =
            get(&url).map_err(|error| Failure::reject(format!("GET {url}: {error}")))?;
        match location {
            Some(next) if follow && (300..400).contains(&status) && hops < 5 => {
                hops += 1;
                url = next;
            }
            _ => break (status, body),
        }
    };
    let topic = config_get("output").unwrap_or_else(|| "fetched".to_owned());
    Ok(vec![
        Outgoing::new(topic, body).with_header("status", status.to_string()),
    ])
}

/// The status, `Location` header and body of a GET of `url`.
fn get(url: &str) -> Result<(u16, Option<String>, Vec<u8>), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "not an absolute URL".to_owned())?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(&Method::Get).map_err(|()| "method")?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_owned()),
    };
    request.set_scheme(Some(&scheme)).map_err(|()| "scheme")?;
    request
        .set_authority(Some(authority))
        .map_err(|()| "authority")?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| "path")?;
    let pending = outgoing_handler::handle(request, None).map_err(describe)?;
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or("no response after waiting for it")?
        .map_err(|()| "response taken twice")?
        .map_err(describe)?;
    let status = response.status();
    let location = response
        .headers()
        .get("location")
        .into_iter()
        .next()
        .and_then(|value| String::from_utf8(value).ok());
    let body = response.consume().map_err(|()| "body taken twice")?;
    let mut bytes = Vec::new();
    body.stream()
        .map_err(|()| "body stream taken twice")?
        .read_to_end(&mut bytes)
        .map_err(|error| error.to_string())?;
    Ok((status, location, bytes))
}

fn describe(error: ErrorCode) -> String {
    format!("{error:?}")
}

handler!(fetch);
