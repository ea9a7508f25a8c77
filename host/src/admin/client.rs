//! The CLI's side of the admin API: `sluice deploy`, `plugins`, `rollback`,
//! `routes`, `pause`, `resume`, `stats`.

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where the admin API is and how to authenticate.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        let request = self.agent.get(format!("{}{path}", self.base));
        let request = match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        };
        self.answer(path, request.call())
    }

    pub fn post(&self, path: &str) -> Result<Value> {
        self.send(
            self.agent.post(format!("{}{path}", self.base)),
            path,
            Vec::new(),
        )
    }

    pub fn put(&self, path: &str, body: Vec<u8>) -> Result<Value> {
        self.send(self.agent.put(format!("{}{path}", self.base)), path, body)
    }

    /// The metrics page, as text.
    pub fn metrics(&self) -> Result<String> {
        let request = self.agent.get(format!("{}/metrics", self.base));
        let request = match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        };
        let mut response = request.call().with_context(|| self.unreachable())?;
        let text = response.body_mut().read_to_string()?;
        if !response.status().is_success() {
            bail!("{}: {text}", response.status());
        }
        Ok(text)
    }

    fn send(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithBody>,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Value> {
        let request = match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        };
        self.answer(path, request.send(&body[..]))
    }

    fn answer(
        &self,
        path: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut response = result.with_context(|| self.unreachable())?;
        let status = response.status();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{path}: {status}: {message}");
        }
        Ok(value)
    }

    fn unreachable(&self) -> String {
        format!(
            "cannot reach the admin API at {} (is `sluice run` running with an [admin] table?)",
            self.base
        )
    }
}
