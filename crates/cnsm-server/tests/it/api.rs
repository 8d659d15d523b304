//! Every resource route and every error status, with the store unchanged after each error.

use serde_json::{Value, json};

use crate::support::{COUNTER_YAML, PREFIX, TestServer, assert_problem, path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statemachines_apply_list_get_delete() {
    let server = TestServer::start().await;
    let machines = path("shop", "statemachines");

    let created = server
        .post_raw(&machines, "application/yaml", COUNTER_YAML.as_bytes(), &[])
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(
        created.header("location"),
        Some(path("shop", "statemachines/counter").as_str())
    );
    let body = created.json();
    assert_eq!(body["name"], "counter");
    assert_eq!(body["namespace"], "shop");
    assert_eq!(body["revision"], 1);
    assert_eq!(body["created"], true);
    assert_eq!(body["hash"].as_str().map(str::len), Some(64));

    let unchanged = server
        .post_raw(&machines, "application/yaml", COUNTER_YAML.as_bytes(), &[])
        .await;
    assert_eq!(unchanged.status, 200, "{}", unchanged.text());
    assert_eq!(unchanged.json()["created"], false);
    assert_eq!(unchanged.json()["revision"], 1);

    // JSON works too, compact or pretty; a change is a new revision.
    let mut definition = server
        .get(&path("shop", "statemachines/counter"))
        .await
        .json();
    assert_eq!(definition["status"]["revision"], 1);
    definition.as_object_mut().expect("object").remove("status");
    definition["metadata"]["labels"] = json!({"team": "ops"});
    let revised = server
        .post_raw(
            &machines,
            "application/json",
            definition.to_string().as_bytes(),
            &[],
        )
        .await;
    assert_eq!(revised.status, 201, "{}", revised.text());
    assert_eq!(revised.json()["revision"], 2);
    let pretty = serde_json::to_string_pretty(&definition).expect("json");
    let same = server
        .post_raw(&machines, "application/json", pretty.as_bytes(), &[])
        .await;
    assert_eq!(same.status, 200, "{}", same.text());

    let list = server.get(&machines).await;
    assert_eq!(list.status, 200);
    let items = list.json()["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["status"]["revision"], 2);
    assert_eq!(items[0]["metadata"]["labels"]["team"], "ops");
    let everywhere = server.get(&format!("{PREFIX}/statemachines")).await.json();
    assert_eq!(everywhere["items"].as_array().map(Vec::len), Some(1));
    let other_namespace = server.get(&path("elsewhere", "statemachines")).await.json();
    assert_eq!(other_namespace["items"], json!([]));

    let first = server
        .get(&path("shop", "statemachines/counter?revision=1"))
        .await
        .json();
    assert_eq!(first["status"]["revision"], 1);
    assert!(first["metadata"].get("labels").is_none(), "{first}");
    let missing_revision = server
        .get(&path("shop", "statemachines/counter?revision=9"))
        .await;
    let problem = assert_problem(&missing_revision, 404, "not-found", "NotFound");
    assert_eq!(
        problem["detail"],
        "statemachine shop/counter revision 9 not found"
    );
    assert_problem(
        &server
            .get(&path("shop", "statemachines/counter?revision=x"))
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server.get(&path("shop", "statemachines/nope")).await,
        404,
        "not-found",
        "NotFound",
    );

    // Delete: refused while an instance is active, then allowed.
    server.create_counter("shop", "c-1").await;
    let refused = server.delete(&path("shop", "statemachines/counter")).await;
    let problem = assert_problem(&refused, 409, "conflict", "Conflict");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1 active instance")),
        "{problem}"
    );
    assert_eq!(
        server
            .send("shop", "c-1", &json!({"event": "close"}), &[])
            .await
            .status,
        200
    );
    let deleted = server.delete(&path("shop", "statemachines/counter")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(deleted.json()["deleted"], true);
    assert_problem(
        &server.delete(&path("shop", "statemachines/counter")).await,
        404,
        "not-found",
        "NotFound",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statemachine_errors() {
    let server = TestServer::start().await;
    let machines = path("shop", "statemachines");

    // Admission: every problem, with path, line and column.
    let broken = "apiVersion: statemachine.cn/v1alpha1\nkind: StateMachine\nmetadata:\n  name: broken\nspec:\n  initialState: created\n  states:\n  - name: created\n    type: task\n    transition: validated\n  - name: other\n    type: task\n    timeoutSeconds: 5\n    onEvent:\n    - event: go\n      target: nowhere\n";
    let rejected = server
        .post_raw(&machines, "application/yaml", broken.as_bytes(), &[])
        .await;
    let problem = assert_problem(&rejected, 400, "invalid", "Invalid");
    let problems = problem["problems"].as_array().cloned().unwrap_or_default();
    let errors: Vec<&Value> = problems
        .iter()
        .filter(|p| p["severity"] == "error")
        .collect();
    assert!(errors.len() >= 3, "{problem:#}");
    for p in &errors {
        assert!(p["path"].as_str().is_some_and(|s| !s.is_empty()), "{p}");
        assert!(
            p["line"].as_u64().is_some() && p["column"].as_u64().is_some(),
            "{p}"
        );
    }
    let text = problem.to_string();
    assert!(
        text.contains("validated") && text.contains("nowhere"),
        "{text}"
    );
    assert!(text.contains("timeoutSeconds"), "{text}");

    // Admission of JSON has positions too.
    let json_broken = r#"{"apiVersion": "statemachine.cn/v1alpha1", "kind": "StateMachine",
 "metadata": {"name": "j"}, "spec": {"initialState": "a", "states": [
   {"name": "a", "type": "task", "timeoutSeconds": 5, "transition": "zzz"}]}}"#;
    let problem = assert_problem(
        &server
            .post_raw(&machines, "application/json", json_broken.as_bytes(), &[])
            .await,
        400,
        "invalid",
        "Invalid",
    );
    let first = &problem["problems"][0];
    assert_eq!(first["line"], 3, "{problem:#}");
    assert!(problem.to_string().contains("zzz"));

    // Malformed JSON: the serde position.
    let problem = assert_problem(
        &server
            .post_raw(&machines, "application/json", b"{\"apiVersion\": ", &[])
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert_eq!(problem["line"], 1, "{problem}");
    assert!(problem["column"].as_u64().is_some(), "{problem}");

    // The body's namespace must match the path's.
    let elsewhere =
        COUNTER_YAML.replace("  name: counter\n", "  name: counter\n  namespace: other\n");
    let problem = assert_problem(
        &server
            .post_raw(&machines, "application/yaml", elsewhere.as_bytes(), &[])
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("other"))
    );

    assert_problem(
        &server
            .post_raw(&machines, "application/xml", b"<x/>", &[])
            .await,
        415,
        "unsupported-media-type",
        "Invalid",
    );
    assert_problem(
        &server
            .post_raw(&machines, "application/yaml", &[0xff, 0xfe], &[])
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server
            .post_raw(
                &path("Not_A_Label", "statemachines"),
                "application/yaml",
                COUNTER_YAML.as_bytes(),
                &[],
            )
            .await,
        400,
        "invalid",
        "Invalid",
    );
    // Nothing was stored by any of these.
    assert_eq!(server.get(&machines).await.json()["items"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_create_get_list_history() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    let instances = path("shop", "instances");

    let created = server
        .post(
            &instances,
            &json!({"id": "a-1", "machine": "counter", "data": {"n": 0}, "labels": {"tier": "gold", "region": "eu"}}),
            &[],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.header("etag"), Some("\"0\""));
    assert_eq!(
        created.header("location"),
        Some(path("shop", "instances/a-1").as_str())
    );
    let body = created.json();
    assert_eq!(body["state"], "open");
    assert_eq!(body["version"], 0);
    assert_eq!(body["labels"]["tier"], "gold");

    // A generated id.
    let generated = server
        .post(
            &instances,
            &json!({"machine": "counter", "data": {"n": 5}}),
            &[],
        )
        .await;
    assert_eq!(generated.status, 201, "{}", generated.text());
    let generated_id = generated.json()["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!generated_id.is_empty());

    for id in ["b-1", "b-2", "b-3"] {
        server.create_counter("shop", id).await;
    }
    server
        .send("shop", "b-2", &json!({"event": "close"}), &[])
        .await;

    // Errors on create: duplicate, unknown machine, bad id, bad body, unknown field.
    let duplicate = server
        .post(
            &instances,
            &json!({"id": "a-1", "machine": "counter", "data": {"n": 0}}),
            &[],
        )
        .await;
    let problem = assert_problem(&duplicate, 409, "conflict", "Conflict");
    assert_eq!(problem["instanceId"], "a-1");
    assert_problem(
        &server
            .post(&instances, &json!({"id": "x", "machine": "nope"}), &[])
            .await,
        404,
        "not-found",
        "NotFound",
    );
    assert_problem(
        &server
            .post(
                &instances,
                &json!({"id": "bad id!", "machine": "counter"}),
                &[],
            )
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server
            .post(&instances, &json!({"machine": "counter", "data": [1]}), &[])
            .await,
        400,
        "invalid",
        "Invalid",
    );
    let problem = assert_problem(
        &server
            .post(
                &instances,
                &json!({"machine": "counter", "colour": "red"}),
                &[],
            )
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("colour")),
        "{problem}"
    );

    // Get with ETag; unknown instance and namespace.
    let got = server.get(&path("shop", "instances/a-1")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("etag"), Some("\"0\""));
    assert_eq!(got.json()["id"], "a-1");
    let problem = assert_problem(
        &server.get(&path("shop", "instances/none")).await,
        404,
        "not-found",
        "NotFound",
    );
    assert_eq!(problem["detail"], "instance shop/none not found");
    assert_eq!(problem["instanceId"], "none");
    assert_eq!(problem["instance"], path("shop", "instances/none"));
    assert_problem(
        &server.get(&path("nowhere", "instances/a-1")).await,
        404,
        "not-found",
        "NotFound",
    );

    // Lists: filters.
    let ids = |r: &Value| -> Vec<String> {
        r["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let all = server.get(&instances).await.json();
    assert_eq!(ids(&all).len(), 5);
    assert!(all["metadata"].get("continue").is_none(), "{all}");
    let gold = server
        .get(&format!("{instances}?labelSelector=tier=gold,region=eu"))
        .await
        .json();
    assert_eq!(ids(&gold), ["a-1"]);
    let closed = server
        .get(&format!("{instances}?state=closed"))
        .await
        .json();
    assert_eq!(ids(&closed), ["b-2"]);
    let succeeded = server
        .get(&format!("{instances}?status=succeeded"))
        .await
        .json();
    assert_eq!(ids(&succeeded), ["b-2"]);
    let by_machine = server
        .get(&format!("{instances}?machine=counter&status=active"))
        .await
        .json();
    assert_eq!(ids(&by_machine).len(), 4);
    assert_eq!(
        ids(&server
            .get(&format!("{instances}?machine=other"))
            .await
            .json())
        .len(),
        0
    );
    let everywhere = server
        .get(&format!("{PREFIX}/instances?status=active"))
        .await
        .json();
    assert_eq!(ids(&everywhere).len(), 4);

    // Pagination.
    let mut seen = Vec::new();
    let mut url = format!("{instances}?limit=2");
    let mut n_pages = 0;
    loop {
        let page = server.get(&url).await.json();
        n_pages += 1;
        seen.extend(ids(&page));
        match page["metadata"]["continue"].as_str() {
            Some(token) => url = format!("{instances}?limit=2&continue={token}"),
            None => break,
        }
    }
    assert_eq!(n_pages, 3);
    let mut sorted = ids(&all);
    sorted.sort();
    assert_eq!(seen, sorted);
    for bad in [
        "continue=zz",
        "status=sleeping",
        "limit=-1",
        "labelSelector=novalue",
    ] {
        assert_problem(
            &server.get(&format!("{instances}?{bad}")).await,
            400,
            "invalid",
            "Invalid",
        );
    }

    // History pages.
    for _ in 0..5 {
        let r = server
            .send("shop", "a-1", &json!({"event": "tick"}), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let history = path("shop", "instances/a-1/history");
    let page = server.get(&format!("{history}?limit=4")).await.json();
    let versions: Vec<u64> = page["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["record"]["version"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(versions, [0, 1, 2, 3]);
    assert_eq!(page["next"], 4);
    let rest = server
        .get(&format!("{history}?from=4&limit=4"))
        .await
        .json();
    let items = rest["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2);
    assert!(rest.get("next").is_none(), "{rest}");
    assert_eq!(items[1]["record"]["data"]["n"], 5);
    let hash = items[0]["hash"].as_str().unwrap_or_default();
    assert_eq!(items[1]["record"]["prevHash"], hash);
    assert_eq!(
        server.get(&format!("{history}?limit=5000")).await.json()["items"]
            .as_array()
            .map(Vec::len),
        Some(6)
    );
    assert_problem(
        &server.get(&format!("{history}?from=abc")).await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server.get(&path("shop", "instances/none/history")).await,
        404,
        "not-found",
        "NotFound",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_their_errors_change_nothing() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "e-1").await;
    let events = path("shop", "instances/e-1/events");

    let ok = server
        .send("shop", "e-1", &json!({"event": "tick"}), &[])
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("etag"), Some("\"1\""));
    let body = ok.json();
    assert_eq!(body["record"]["version"], 1);
    assert_eq!(body["record"]["event"], "tick");
    assert_eq!(body["record"]["actor"], "anonymous");
    assert_eq!(body["instance"]["data"]["n"], 1);
    assert_eq!(body["replayed"], false);
    assert_eq!(body["hash"], body["instance"]["lastHash"]);

    // The issue's example: curl -d without a Content-Type (form-urlencoded) is read as JSON.
    let curl = server
        .post_raw(
            &events,
            "application/x-www-form-urlencoded",
            br#"{"event":"tick","actor":"curl"}"#,
            &[("if-match", "\"1\""), ("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(curl.status, 200, "{}", curl.text());
    assert_eq!(curl.header("etag"), Some("\"2\""));
    assert_eq!(curl.json()["record"]["actor"], "curl");
    assert_eq!(curl.json()["record"]["idempotencyKey"], "k1");

    // Idempotent replay: the original result, nothing applied twice.
    let replay = server
        .send(
            "shop",
            "e-1",
            &json!({"event": "tick", "actor": "curl"}),
            &[("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(replay.status, 200, "{}", replay.text());
    assert_eq!(replay.json()["replayed"], true);
    assert_eq!(replay.json()["record"]["version"], 2);
    assert_eq!(replay.header("etag"), Some("\"2\""));

    let before = server.state_of("shop", "e-1").await;
    // Each rejected request: its documented status and body, and the store unchanged.
    let stale = server
        .send(
            "shop",
            "e-1",
            &json!({"event": "tick"}),
            &[("if-match", "\"0\"")],
        )
        .await;
    let problem = assert_problem(&stale, 412, "stale-state", "StaleState");
    assert_eq!(problem["expectedVersion"], 0);
    assert_eq!(problem["actualVersion"], 2);
    assert_eq!(problem["state"], "open");
    assert_eq!(problem["event"], "tick");
    assert_eq!(problem["instanceId"], "e-1");
    assert_eq!(problem["namespace"], "shop");

    let reused = server
        .send(
            "shop",
            "e-1",
            &json!({"event": "close"}),
            &[("idempotency-key", "k1")],
        )
        .await;
    let problem = assert_problem(&reused, 409, "conflict", "Conflict");
    assert!(
        problem["detail"].as_str().is_some_and(|d| d.contains("k1")),
        "{problem}"
    );

    let failure = server
        .send(
            "shop",
            "e-1",
            &json!({"event": "pay", "payload": {"amount": 3}}),
            &[],
        )
        .await;
    let problem = assert_problem(&failure, 422, "transition-failure", "TransitionFailure");
    assert_eq!(problem["state"], "open");
    assert_eq!(problem["event"], "pay");
    assert_eq!(problem["reason"], "GuardsFalse");
    let unknown_event = server
        .send("shop", "e-1", &json!({"event": "fly"}), &[])
        .await;
    let problem = assert_problem(
        &unknown_event,
        422,
        "transition-failure",
        "TransitionFailure",
    );
    assert_eq!(problem["reason"], "NoTransition");

    let malformed = server
        .post_raw(
            &events,
            "application/json",
            b"{\"event\": \"tick\",\n \"payload\": }",
            &[],
        )
        .await;
    let problem = assert_problem(&malformed, 400, "invalid", "Invalid");
    assert_eq!(problem["line"], 2, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("line 2")),
        "{problem}"
    );
    assert_problem(
        &server
            .send("shop", "e-1", &json!({"payload": {}}), &[])
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server.send("shop", "e-1", &json!({"event": ""}), &[]).await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server
            .send(
                "shop",
                "e-1",
                &json!({"event": "tick"}),
                &[("if-match", "\"abc\"")],
            )
            .await,
        400,
        "invalid",
        "Invalid",
    );
    let huge = format!(
        "{{\"event\": \"tick\", \"payload\": {{\"blob\": \"{}\"}}}}",
        "x".repeat(1 << 20)
    );
    let too_large = server
        .post_raw(&events, "application/json", huge.as_bytes(), &[])
        .await;
    assert_problem(&too_large, 413, "payload-too-large", "Invalid");
    assert_problem(
        &server
            .post_raw(&events, "application/xml", b"<tick/>", &[])
            .await,
        415,
        "unsupported-media-type",
        "Invalid",
    );
    assert_problem(
        &server
            .send("shop", "none", &json!({"event": "tick"}), &[])
            .await,
        404,
        "not-found",
        "NotFound",
    );
    assert_problem(
        &server
            .send("nowhere", "e-1", &json!({"event": "tick"}), &[])
            .await,
        404,
        "not-found",
        "NotFound",
    );
    assert_eq!(server.state_of("shop", "e-1").await, before);

    // If-Match at the right version applies; a final instance refuses further events.
    let closed = server
        .send(
            "shop",
            "e-1",
            &json!({"event": "close"}),
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(closed.status, 200, "{}", closed.text());
    assert_eq!(closed.json()["instance"]["status"], "succeeded");
    let problem = assert_problem(
        &server
            .send("shop", "e-1", &json!({"event": "tick"}), &[])
            .await,
        422,
        "transition-failure",
        "TransitionFailure",
    );
    assert_eq!(problem["reason"], "InstanceFinal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_methods_and_timeouts_are_problems() {
    let server = TestServer::start().await;
    let problem = assert_problem(&server.get("/nope").await, 404, "not-found", "NotFound");
    assert_eq!(problem["instance"], "/nope");
    assert_problem(
        &server.delete(&path("shop", "instances")).await,
        405,
        "method-not-allowed",
        "Invalid",
    );
    server.stop().await.expect("clean stop");

    // A request that cannot finish in time: 503 with Retry-After.
    let server = TestServer::start_with(cnsm_server::ServerOptions {
        request_timeout: std::time::Duration::from_nanos(1),
        ..cnsm_server::ServerOptions::default()
    })
    .await;
    let r = server
        .post_raw(
            &path("shop", "statemachines"),
            "application/yaml",
            COUNTER_YAML.as_bytes(),
            &[],
        )
        .await;
    if r.status != 201 {
        let problem = assert_problem(&r, 503, "timeout", "Timeout");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("Idempotency-Key"))
        );
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    // A create carries the request's deadline into the runtime too: refused as Timeout and,
    // having waited in the queue past it, not applied.
    let r = server
        .post(
            &path("shop", "instances"),
            &json!({"id": "t-1", "machine": "counter", "data": {"n": 0}}),
            &[],
        )
        .await;
    assert_problem(&r, 503, "timeout", "Timeout");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        server.runtime.instance("shop", "t-1").await.is_err(),
        "the timed-out create was not applied"
    );
    if server
        .runtime
        .definition("shop", "counter", None)
        .await
        .is_err()
    {
        server
            .runtime
            .apply_yaml(COUNTER_YAML, None)
            .await
            .expect("apply");
    }
    let mut data = serde_json::Map::new();
    data.insert("n".into(), 0.into());
    server
        .runtime
        .create_instance(
            cnsm_runtime::CreateInstance::new("shop", "counter")
                .id("t-1")
                .data(data),
        )
        .await
        .expect("create t-1");
    // An event carries the request's deadline into the runtime: refused as Timeout, and,
    // having waited in the queue past it, not applied.
    let before = server
        .runtime
        .instance("shop", "t-1")
        .await
        .expect("t-1")
        .version;
    let r = server
        .send("shop", "t-1", &json!({"event": "tick"}), &[])
        .await;
    assert_problem(&r, 503, "timeout", "Timeout");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Give the committer time to take it from the queue (it refuses it there).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let history = server
        .runtime
        .history("shop", "t-1", 0, 100)
        .await
        .expect("history");
    assert_eq!(
        history.len() as u64,
        before + 1,
        "the timed-out event was not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_addresses_need_auth_or_insecure() {
    let any: std::net::SocketAddr = "0.0.0.0:8080".parse().expect("address");
    let error = cnsm_server::check_listen_address(any, false, false)
        .expect_err("refused")
        .to_string();
    assert!(error.contains("--auth-file"), "{error}");
    assert!(error.contains("--insecure"), "{error}");
    assert!(cnsm_server::check_listen_address(any, false, true).is_ok());
    assert!(cnsm_server::check_listen_address(any, true, false).is_ok());
    let loopback: std::net::SocketAddr = "127.0.0.1:8080".parse().expect("address");
    assert!(cnsm_server::check_listen_address(loopback, false, false).is_ok());
    let v6: std::net::SocketAddr = "[::1]:8080".parse().expect("address");
    assert!(cnsm_server::check_listen_address(v6, false, false).is_ok());

    let dir = tempfile::tempdir().expect("tempdir");
    let store = cnsm_store::embedded::EmbeddedStore::open(dir.path()).expect("store");
    let runtime = cnsm_runtime::Runtime::open(store, cnsm_runtime::RuntimeOptions::default())
        .expect("runtime");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let refused = cnsm_server::serve(
        listener,
        runtime.clone(),
        cnsm_server::ServerOptions::default(),
        std::future::ready(()),
    )
    .await;
    assert!(
        matches!(refused, Err(cnsm_server::ServeError::NotLoopback(_))),
        "{refused:?}"
    );
    runtime.shutdown();
}
