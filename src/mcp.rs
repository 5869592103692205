//! A Model Context Protocol server on stdio (the official `rmcp` SDK), so
//! orchestration layers can read the usage policy and this node's state.
//!
//! Everything it offers is read-only: four resources (usage policy, terms,
//! status, compliance) and three tools (`usage_status`, `compliance_check`,
//! `audit_verify`). Nothing here starts, approves or changes a job, and
//! `audit_verify` only walks the chain: unlike `audit verify` on the command
//! line it does not settle a crashed append, which would write to the log.
//!
//! stdout carries the protocol and nothing else; logs go to stderr (through
//! `tracing`, only when asked for with `-vv` or `RUST_LOG`). The server ends
//! when the client closes stdin.

use std::borrow::Cow;
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, JsonObject, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    Resource, ResourceContents, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{json, Value};

use crate::audit::AuditLog;
use crate::compliance::{self, EMBEDDED_CHECKLIST};
use crate::config::Config;
use crate::legal;
use crate::paths::Paths;
use crate::status;

pub const USAGE_POLICY_URI: &str = "cmm://usage_policy";
pub const TERMS_URI: &str = "cmm://terms";
pub const STATUS_URI: &str = "cmm://status";
pub const COMPLIANCE_URI: &str = "cmm://compliance";

/// Errors that stop the server itself (not a failed request).
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("cannot start the MCP runtime: {0}")]
    Runtime(std::io::Error),
    #[error("MCP session failed: {0}")]
    Session(String),
}

impl crate::exit::HasExit for McpError {
    fn exit(&self) -> crate::exit::Exit {
        crate::exit::Exit::Failed
    }
}

/// The server: a handle on this install's files, read fresh on every request
/// so answers follow changes made by other commands while it runs.
#[derive(Debug, Clone)]
pub struct NodeServer {
    paths: Paths,
}

impl NodeServer {
    pub fn new(paths: Paths) -> NodeServer {
        NodeServer { paths }
    }

    fn status_json(&self) -> Result<Value, String> {
        let cfg = Config::load(&self.paths).map_err(|e| e.to_string())?;
        let report = status::read(&self.paths, &cfg).map_err(|e| e.to_string())?;
        Ok(json!(report))
    }

    fn compliance_json(&self) -> Result<Value, String> {
        let list = compliance::parse_checklist("compliance-config.json (embedded)", EMBEDDED_CHECKLIST)
            .map_err(|e| e.to_string())?;
        let report = compliance::run(&self.paths, &list).map_err(|e| e.to_string())?;
        Ok(json!(report))
    }

    fn verify_json(&self) -> Result<Value, String> {
        let rep = AuditLog::new(&self.paths).verify().map_err(|e| e.to_string())?;
        Ok(json!(rep))
    }

    /// The terms as one document: version, SHA-256 and text.
    fn terms_json() -> Value {
        json!({
            "version": legal::TERMS_VERSION,
            "sha256": legal::terms_sha256(),
            "usage_policy": legal::USAGE_POLICY,
            "text": legal::TERMS,
        })
    }
}

fn resources() -> Vec<Resource> {
    vec![
        Resource::new(USAGE_POLICY_URI, "usage_policy")
            .with_title("Usage policy")
            .with_description(
                "The usage policy in one sentence: no proxying or resale, own login only, voluntary, credentials never transmitted",
            )
            .with_mime_type("text/plain"),
        Resource::new(TERMS_URI, "terms")
            .with_title("Terms, usage policy and your rights")
            .with_description("Full terms with their version and SHA-256")
            .with_mime_type("application/json"),
        Resource::new(STATUS_URI, "status")
            .with_title("Node status")
            .with_description("Consent, caps and usage per window, open reservations, audit head")
            .with_mime_type("application/json"),
        Resource::new(COMPLIANCE_URI, "compliance")
            .with_title("Compliance check")
            .with_description("Results of the compliance checklist over this install (not legal advice)")
            .with_mime_type("application/json"),
    ]
}

fn no_arguments() -> Arc<JsonObject> {
    let schema = json!({ "type": "object", "properties": {}, "additionalProperties": false });
    match schema {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("a JSON object literal"),
    }
}

fn tools() -> Vec<Tool> {
    let read_only = || ToolAnnotations::default().read_only(true);
    vec![
        Tool::new(
            "usage_status",
            "Consent, caps against usage per day/week/month with reset times, open reservations (read-only)",
            no_arguments(),
        )
        .with_annotations(read_only()),
        Tool::new(
            "compliance_check",
            "Run the compliance checklist over this install and return each result (read-only; not legal advice)",
            no_arguments(),
        )
        .with_annotations(read_only()),
        Tool::new(
            "audit_verify",
            "Walk the audit log's hash chain and compare it with its head (read-only)",
            no_arguments(),
        )
        .with_annotations(read_only()),
    ]
}

impl ServerHandler for NodeServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_resources().enable_tools().build())
            .with_server_info(Implementation::new("claude-max-market", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "Read-only view of a claude-max-market node. Usage policy: {}",
                legal::USAGE_POLICY
            ))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(resources()))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let uri = request.uri;
        let json_doc = |v: Result<Value, String>| -> Result<String, ErrorData> {
            let v = v.map_err(|m| ErrorData::internal_error(m, None))?;
            Ok(serde_json::to_string_pretty(&v).expect("JSON values serialise"))
        };
        let contents = match uri.as_str() {
            USAGE_POLICY_URI => ResourceContents::text(legal::USAGE_POLICY, uri.clone()),
            TERMS_URI => ResourceContents::text(json_doc(Ok(Self::terms_json()))?, uri.clone())
                .with_mime_type("application/json"),
            STATUS_URI => {
                ResourceContents::text(json_doc(self.status_json())?, uri.clone()).with_mime_type("application/json")
            }
            COMPLIANCE_URI => ResourceContents::text(json_doc(self.compliance_json())?, uri.clone())
                .with_mime_type("application/json"),
            _ => {
                return Err(ErrorData::resource_not_found(
                    format!("no resource {uri}; see resources/list"),
                    Some(json!({ "uri": uri })),
                ))
            }
        };
        Ok(ReadResourceResult::new(vec![contents]).into())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let result = match request.name.as_ref() {
            "usage_status" => self.status_json(),
            "compliance_check" => self.compliance_json(),
            "audit_verify" => self.verify_json(),
            other => {
                return Err(ErrorData::invalid_params(
                    Cow::Owned(format!("no tool `{other}`; see tools/list")),
                    None,
                ))
            }
        };
        // A tool that ran and could not answer is a tool-level error the
        // caller reads, not a protocol error.
        Ok(match result {
            Ok(v) => CallToolResult::structured(v),
            Err(m) => CallToolResult::structured_error(json!({ "error": m })),
        }
        .into())
    }
}

/// Serve MCP on stdin/stdout until the client closes stdin.
pub fn serve_stdio(paths: Paths) -> Result<(), McpError> {
    // One client, one connection, short synchronous handlers: a
    // current-thread runtime is all this needs.
    let rt = crate::runtime::current_thread().map_err(McpError::Runtime)?;
    rt.block_on(async move {
        let service = NodeServer::new(paths)
            .serve(rmcp::transport::stdio())
            .await
            .map_err(|e| McpError::Session(e.to_string()))?;
        let reason = service.waiting().await.map_err(|e| McpError::Session(e.to_string()))?;
        tracing::debug!(?reason, "MCP session ended");
        Ok(())
    })
}
