//! Client mode (`--server URL`): the [`Api`] over the HTTP API of a `cnsmctl serve`.
//!
//! Every call is one or more HTTP requests (lists and history page through the server's
//! limits). A problem+json answer becomes the same [`CliError`] local mode gives, through its
//! `errorType` member, so exit codes and `error: <Type>: <message>` lines do not depend on the
//! mode. A server that cannot be reached is `Unavailable` (exit 5).

use cnsm_core::Instance;
use cnsm_core::resource::StateMachine;
use cnsm_runtime::{
    AppliedDefinition, ControlRequest, CreateInstance, EraseRequest, EventRequest, HistoryEntry,
    MigrationPhase, MigrationReport, MigrationRequest, RolloutChange, RolloutStatus,
    TransitionOutcome,
};
use cnsm_server::client::{Client, ClientResponse, EventStream};
use cnsm_server::migrations::{MigrationBody, MigrationReportView, RolloutBody, RolloutView};
use cnsm_server::snapshots::{ImportReportView, SNAPSHOT_MEDIA_TYPE};
use cnsm_server::wire::{
    API_PREFIX, AppliedView, CreateInstanceBody, EventBody, HISTORY_PAGE_LEN_MAX, HistoryPage,
    InstanceList, LIST_PAGE_LEN_MAX, ProblemDetails, TransitionView, definition_from_view,
};
use cnsm_snapshot::Selection;
use cnsm_snapshot::files::SnapshotPaths;
use cnsm_store::{BackupReport, DefinitionRow, ImportReport, VerifyReport};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{Api, InstanceFilter};
use crate::error::CliError;

/// A cnsm server reached over HTTP.
#[derive(Debug, Clone)]
pub struct Remote {
    client: Client,
}

/// Percent-encodes a path segment or query value (everything but unreserved characters).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn namespace_path(namespace: &str, rest: &str) -> String {
    format!("{API_PREFIX}/namespaces/{}/{rest}", encode(namespace))
}

/// The error of a problem+json (or any non-2xx) answer.
fn problem_error(response: &ClientResponse) -> CliError {
    let problem: ProblemDetails = serde_json::from_slice(&response.body).unwrap_or_default();
    let error_type = if problem.error_type.is_empty() {
        match response.status {
            404 => "NotFound",
            409 => "Conflict",
            412 => "StaleState",
            422 => "TransitionFailure",
            423 => "Locked",
            401 => "Unauthorized",
            403 => "Forbidden",
            s if s >= 500 => "Unavailable",
            _ => "Invalid",
        }
        .to_owned()
    } else {
        problem.error_type
    };
    let message = if problem.detail.is_empty() {
        format!("the server answered HTTP {}", response.status)
    } else {
        problem.detail
    };
    let mut error = CliError::new(error_type, message);
    error.diagnostics = problem.problems.iter().map(|p| p.render(None)).collect();
    error
}

impl Remote {
    /// A client of the server at `url` (`http://host:port` or `https://host:port`). Nothing
    /// is contacted yet. `token` is sent as `Authorization: Bearer <token>` with every
    /// request; `ca_cert` (a PEM file) holds the certificates trusted for https.
    pub fn new(
        url: &str,
        token: Option<&str>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Remote, CliError> {
        let mut client =
            Client::new(url).map_err(|e| CliError::invalid(format!("--server: {e}")))?;
        if client.is_https() {
            let Some(ca_cert) = ca_cert else {
                return Err(CliError::invalid(format!(
                    "--server {url}: https needs the certificate to trust: pass --ca-cert FILE \
                     (or set CNSM_CA_CERT) with the PEM certificate of the server's CA, or the \
                     server's own self-signed certificate (system roots are not used)"
                )));
            };
            let config = cnsm_server::tls::client_config(ca_cert)
                .map_err(|e| CliError::invalid(format!("--ca-cert: {e}")))?;
            client = client.with_tls(config);
        }
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            client = client.with_bearer_token(token);
        }
        Ok(Remote { client })
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<ClientResponse, CliError> {
        let mut all = Vec::from(headers);
        if body.is_some() {
            all.push(("content-type", "application/json"));
        }
        let response = self
            .client
            .request(method, path, &all, body.unwrap_or_default())
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))?;
        if (200..300).contains(&response.status) {
            Ok(response)
        } else {
            Err(problem_error(&response))
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let response = self.call("GET", path, &[], None).await?;
        decode(&response)
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        headers: &[(&str, &str)],
    ) -> Result<T, CliError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| CliError::invalid(format!("cannot encode the request: {e}")))?;
        let response = self.call("POST", path, headers, Some(bytes)).await?;
        decode(&response)
    }

    /// `audit export` through the server: the committed audit lines (ND-JSON), streamed into
    /// `dest` as they arrive.
    pub async fn audit_export(
        &self,
        since: Option<&str>,
        dest: &mut (dyn std::io::Write + Send),
    ) -> Result<(), CliError> {
        let mut path = format!("{API_PREFIX}/audit");
        if let Some(since) = since {
            path.push_str("?since=");
            path.push_str(&encode(since));
        }
        let downloaded = self
            .client
            .download("GET", &path, &[("accept", "application/x-ndjson")], dest)
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))?;
        match downloaded {
            Ok(_) => Ok(()),
            Err(response) => Err(problem_error(&response)),
        }
    }

    /// Opens a watch stream: of one instance (`id`), or of the instances `filter` selects.
    pub async fn watch(
        &self,
        filter: &InstanceFilter,
        id: Option<&str>,
    ) -> Result<EventStream, CliError> {
        let path = match (id, &filter.namespace) {
            (Some(id), Some(ns)) => {
                namespace_path(ns, &format!("instances/{}?watch=true", encode(id)))
            }
            (Some(_), None) => {
                return Err(CliError::invalid(
                    "an instance cannot be watched across all namespaces",
                ));
            }
            (None, Some(ns)) => format!(
                "{}{}",
                namespace_path(ns, "instances?watch=true"),
                filter_query(filter)
            ),
            (None, None) => format!("{API_PREFIX}/instances?watch=true{}", filter_query(filter)),
        };
        match self.client.stream(&path, &[]).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(response)) => Err(problem_error(&response)),
            Err(e) => Err(CliError::unavailable(e.to_string())),
        }
    }
}

/// `&machine=..&state=..` for the filters that are set.
fn filter_query(filter: &InstanceFilter) -> String {
    let mut query = String::new();
    if let Some(machine) = &filter.machine {
        query.push_str(&format!("&machine={}", encode(machine)));
    }
    if let Some(state) = &filter.state {
        query.push_str(&format!("&state={}", encode(state)));
    }
    if let Some(status) = filter.status {
        query.push_str(&format!("&status={}", status.as_str()));
    }
    if !filter.labels.is_empty() {
        let selector: Vec<String> = filter
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        query.push_str(&format!("&labelSelector={}", encode(&selector.join(","))));
    }
    query
}

/// The runtime's form of a transition the server answered with.
fn outcome_of(view: TransitionView) -> TransitionOutcome {
    TransitionOutcome {
        record: view.record,
        hash: view.hash,
        instance: view.instance,
        replayed: view.replayed,
    }
}

fn decode<T: DeserializeOwned>(response: &ClientResponse) -> Result<T, CliError> {
    serde_json::from_slice(&response.body)
        .map_err(|e| CliError::unavailable(format!("the server's answer could not be read: {e}")))
}

impl Api for Remote {
    async fn apply(&self, machine: StateMachine) -> Result<AppliedDefinition, CliError> {
        let path = namespace_path(&machine.metadata.namespace, "statemachines");
        let view: AppliedView = self.post(&path, &machine, &[]).await?;
        Ok(AppliedDefinition {
            namespace: view.namespace,
            name: view.name,
            revision: view.revision,
            hash: view.hash,
            created: view.created,
            // Admission ran in this process first and printed its warnings already; keep
            // what only the server could see (states removed under running instances).
            warnings: view
                .warnings
                .iter()
                .filter(|w| w.code == cnsm_core::admission::codes::BREAKING_CHANGE)
                .map(|w| {
                    cnsm_core::admission::Problem::warning(
                        cnsm_core::admission::codes::BREAKING_CHANGE,
                        w.path.clone(),
                        w.message.clone(),
                    )
                })
                .collect(),
        })
    }

    async fn machine(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<DefinitionRow, CliError> {
        let mut path = namespace_path(namespace, &format!("statemachines/{}", encode(name)));
        if let Some(r) = revision {
            path.push_str(&format!("?revision={r}"));
        }
        let view: Value = self.get(&path).await?;
        definition_from_view(view).map_err(|e| {
            CliError::unavailable(format!("the server's answer could not be read: {e}"))
        })
    }

    async fn machines(&self, namespace: Option<&str>) -> Result<Vec<DefinitionRow>, CliError> {
        let path = match namespace {
            Some(ns) => namespace_path(ns, "statemachines"),
            None => format!("{API_PREFIX}/statemachines"),
        };
        #[derive(serde::Deserialize)]
        struct Items {
            items: Vec<Value>,
        }
        let list: Items = self.get(&path).await?;
        list.items
            .into_iter()
            .map(|v| {
                definition_from_view(v).map_err(|e| {
                    CliError::unavailable(format!("the server's answer could not be read: {e}"))
                })
            })
            .collect()
    }

    async fn delete_machine(&self, namespace: &str, name: &str) -> Result<(), CliError> {
        let path = namespace_path(namespace, &format!("statemachines/{}", encode(name)));
        self.call("DELETE", &path, &[], None).await.map(|_| ())
    }

    async fn create_instance(&self, request: CreateInstance) -> Result<Instance, CliError> {
        let path = namespace_path(&request.namespace, "instances");
        let body = CreateInstanceBody {
            id: request.id,
            machine: request.machine,
            data: Some(request.data),
            labels: request.labels,
            revision: request.revision,
            actor: Some(request.actor),
        };
        self.post(&path, &body, &[]).await
    }

    async fn send(
        &self,
        namespace: &str,
        id: &str,
        event: EventRequest,
    ) -> Result<TransitionOutcome, CliError> {
        let path = namespace_path(namespace, &format!("instances/{}/events", encode(id)));
        let if_match = event.expected_version.map(|v| format!("\"{v}\""));
        let traceparent = event
            .trace
            .as_ref()
            .map(|t| format!("00-{}-{}-01", t.trace_id, t.span_id));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(v) = &if_match {
            headers.push(("if-match", v));
        }
        if let Some(key) = &event.idempotency_key {
            headers.push(("idempotency-key", key));
        }
        if let Some(t) = &traceparent {
            headers.push(("traceparent", t));
        }
        let body = EventBody {
            event: event.name,
            payload: event.payload,
            actor: Some(event.actor),
        };
        let view: TransitionView = self.post(&path, &body, &headers).await?;
        Ok(outcome_of(view))
    }

    async fn control(
        &self,
        namespace: &str,
        id: &str,
        request: ControlRequest,
    ) -> Result<TransitionOutcome, CliError> {
        let path = namespace_path(
            namespace,
            &format!("instances/{}/{}", encode(id), request.action.as_str()),
        );
        let body = serde_json::json!({"reason": request.reason, "actor": request.actor});
        let view: TransitionView = self.post(&path, &body, &[]).await?;
        Ok(outcome_of(view))
    }

    async fn erase(
        &self,
        namespace: &str,
        id: &str,
        request: EraseRequest,
    ) -> Result<TransitionOutcome, CliError> {
        let path = namespace_path(namespace, &format!("instances/{}/erase", encode(id)));
        let body = serde_json::json!({
            "fields": request.fields,
            "reason": request.reason,
            "actor": request.actor,
        });
        let view: TransitionView = self.post(&path, &body, &[]).await?;
        Ok(outcome_of(view))
    }

    async fn instance(&self, namespace: &str, id: &str) -> Result<Instance, CliError> {
        self.get(&namespace_path(
            namespace,
            &format!("instances/{}", encode(id)),
        ))
        .await
    }

    async fn instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, CliError> {
        let limit = filter.limit.unwrap_or(usize::MAX);
        let base = match &filter.namespace {
            Some(ns) => namespace_path(ns, "instances?"),
            None => format!("{API_PREFIX}/instances?"),
        };
        let mut out: Vec<Instance> = Vec::new();
        let mut token: Option<String> = None;
        while out.len() < limit {
            let page_len = (limit - out.len()).min(LIST_PAGE_LEN_MAX);
            let mut path = format!("{base}limit={page_len}{}", filter_query(filter));
            if let Some(t) = &token {
                path.push_str(&format!("&continue={}", encode(t)));
            }
            let page: InstanceList = self.get(&path).await?;
            out.extend(page.items);
            match page.metadata.continue_token {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, CliError> {
        let base = namespace_path(namespace, &format!("instances/{}/history", encode(id)));
        let mut out = Vec::new();
        let mut from = from_version;
        while out.len() < limit {
            let page_len = (limit - out.len()).min(HISTORY_PAGE_LEN_MAX);
            let page: HistoryPage = self
                .get(&format!("{base}?from={from}&limit={page_len}"))
                .await?;
            let n = page.items.len();
            out.extend(page.items.into_iter().map(|item| HistoryEntry {
                record: item.record,
                hash: item.hash,
            }));
            match page.next {
                Some(next) if n > 0 => from = next,
                _ => break,
            }
        }
        Ok(out)
    }

    async fn deliveries(
        &self,
        target: Option<&str>,
    ) -> Result<cnsm_server::wire::DeliveryList, CliError> {
        let mut all = cnsm_server::wire::DeliveryList::default();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!(
                "{API_PREFIX}/deliveries?limit={}",
                cnsm_server::deliveries::DEAD_LETTER_PAGE_LEN_MAX
            );
            if let Some(t) = target {
                path.push_str(&format!("&target={}", encode(t)));
            }
            if let Some(t) = &token {
                path.push_str(&format!("&continue={}", encode(t)));
            }
            let page: cnsm_server::wire::DeliveryList = self.get(&path).await?;
            all.cursors = page.cursors;
            all.dead_letters.extend(page.dead_letters);
            match page.metadata.continue_token {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }

    async fn redrive_dead_letters(
        &self,
        request: cnsm_runtime::delivery::RedriveRequest,
    ) -> Result<cnsm_runtime::delivery::RedriveReport, CliError> {
        let body = cnsm_server::wire::RedriveBody {
            target: request.target,
            all: request.position.is_none(),
            position: request.position,
            actor: Some(request.actor).filter(|a| !a.is_empty()),
        };
        self.post(&format!("{API_PREFIX}/deliveries/redrive"), &body, &[])
            .await
    }

    async fn rollout_status(&self, namespace: &str, name: &str) -> Result<RolloutStatus, CliError> {
        let path = namespace_path(
            namespace,
            &format!("statemachines/{}/rollout", encode(name)),
        );
        let view: RolloutView = self.get(&path).await?;
        Ok(view.to_status())
    }

    async fn change_rollout(
        &self,
        namespace: &str,
        name: &str,
        change: RolloutChange,
    ) -> Result<RolloutStatus, CliError> {
        let path = namespace_path(
            namespace,
            &format!("statemachines/{}/rollout", encode(name)),
        );
        let empty = |action: &str| RolloutBody {
            action: action.into(),
            revision: None,
            weight: None,
            flag: None,
        };
        let body = match change {
            RolloutChange::Set { revision, weight } => RolloutBody {
                revision: Some(revision),
                weight: Some(weight),
                ..empty("set")
            },
            RolloutChange::Flag { flag } => RolloutBody {
                flag: Some(flag),
                ..empty("set")
            },
            RolloutChange::Promote => empty("promote"),
            RolloutChange::Abort => empty("abort"),
        };
        let view: RolloutView = self.post(&path, &body, &[]).await?;
        Ok(view.to_status())
    }

    async fn migrate(
        &self,
        request: MigrationRequest,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<MigrationReport, CliError> {
        let policy = serde_json::to_string(&request.policy)
            .map_err(|e| CliError::invalid(format!("cannot encode the policy: {e}")))?;
        let body = MigrationBody {
            policy,
            from_revision: request.from_revision,
            to_revision: request.to_revision,
            dry_run: request.dry_run,
            rollback: request.rollback,
            phase: Some(
                match request.phase {
                    MigrationPhase::All => "all",
                    MigrationPhase::Pre => "pre",
                    MigrationPhase::Post => "post",
                }
                .into(),
            ),
            chunk: request.chunk,
            actor: Some(request.actor.clone()),
        };
        let path = namespace_path(
            &request.namespace,
            &format!("statemachines/{}/migrations", encode(&request.machine)),
        );
        let view: MigrationReportView = self.post(&path, &body, &[]).await?;
        let report = MigrationReport {
            entries: view.entries.iter().map(|e| e.to_entry()).collect(),
        };
        progress(report.entries.len(), report.entries.len());
        Ok(report)
    }

    async fn backup(&self, out: &std::path::Path) -> Result<BackupReport, CliError> {
        if out.exists() {
            return Err(CliError::conflict(format!(
                "{} exists; choose another file or remove it first",
                out.display()
            )));
        }
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let partial = out.with_file_name(name);
        let io = |e: std::io::Error| {
            CliError::unavailable(format!("cannot write {}: {e}", partial.display()))
        };
        let result = async {
            let mut file = std::fs::File::create(&partial).map_err(io)?;
            let path = format!("{API_PREFIX}/backup");
            let downloaded = self
                .client
                .download("POST", &path, &[], &mut file)
                .await
                .map_err(|e| CliError::unavailable(e.to_string()))?;
            if let Err(response) = downloaded {
                return Err(problem_error(&response));
            }
            file.sync_all().map_err(io)?;
            drop(file);
            // Checked again on arrival: what was written here is a store that verifies.
            let checked = partial.clone();
            let verified = tokio::task::spawn_blocking(move || {
                cnsm_store::embedded::backup::verify_backup_file(&checked)
            })
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))??;
            std::fs::rename(&partial, out).map_err(io)?;
            let bytes = std::fs::metadata(out).map_err(io)?.len();
            Ok(BackupReport {
                path: out.to_owned(),
                bytes,
                verified,
            })
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    async fn export_snapshot(
        &self,
        namespace: &str,
        selection: &Selection,
        out: &mut (dyn std::io::Write + Send),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, CliError> {
        let query = match selection {
            Selection::All => String::new(),
            Selection::Instance(id) => format!("?instance={}", encode(id)),
            Selection::Labels(labels) => {
                let selector: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("?labelSelector={}", encode(&selector.join(",")))
            }
        };
        let path = format!("{}{query}", namespace_path(namespace, "snapshot"));
        // Streamed to `out` as it arrives; the caller checks the payload (steps 4-6) before
        // signing, so a body that is not a snapshot stops there.
        let downloaded = self
            .client
            .download("GET", &path, &[("accept", SNAPSHOT_MEDIA_TYPE)], out)
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))?;
        let n_bytes = downloaded.map_err(|response| problem_error(&response))?;
        progress(1, 1);
        Ok(n_bytes)
    }

    async fn import_snapshot(
        &self,
        namespace: &str,
        payload: &SnapshotPaths,
        _public_key: &cnsm_snapshot::PublicKey,
        replace: bool,
        mut progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> Result<ImportReport, CliError> {
        let file = payload
            .payload()
            .map_err(|e| CliError::invalid(e.to_string()))?;
        let path = format!(
            "{}?replace={replace}",
            namespace_path(namespace, "snapshot")
        );
        let response = self
            .client
            .upload(
                "POST",
                &path,
                &[("content-type", SNAPSHOT_MEDIA_TYPE)],
                file,
            )
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))?;
        if !(200..300).contains(&response.status) {
            return Err(problem_error(&response));
        }
        progress(1, 1);
        let view: ImportReportView = decode(&response)?;
        Ok(view.into())
    }

    async fn verify_store(&self) -> Result<VerifyReport, CliError> {
        Err(CliError::invalid(
            "store verify reads the embedded store directly and does not work with --server; \
             run it on the server's host without --server while the server is stopped",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_ids_and_escapes_the_rest() {
        assert_eq!(encode("o-1.a_b:c~"), "o-1.a_b:c~");
        assert_eq!(encode("a b/c?d=e&f"), "a%20b%2Fc%3Fd%3De%26f");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
