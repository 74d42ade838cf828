//! JSON Schemas of the event documents and of the envelope, generated from the Rust types so
//! the published schemas cannot drift from the code (Choria's hand-written ones did).
//!
//! The generated files are checked in under `schemas/json/`; a unit test fails when they
//! differ from what this module produces (run the tests with `CHORUS_BLESS=1` to rewrite them).
//! Each `<type>.json` describes the CloudEvents `data` of that type; `envelope.json` describes
//! the CloudEvents envelope around it.
//!
//! The schemas state what Chorus *writes*. Decode is more lenient where Choria's own output
//! differs: the legacy `choria:lifecycle:<type>:1` protocol, `null` for empty lists and
//! objects (Go nil), an audit `request` given as a JSON string, `seq` as a decimal string,
//! any JSON `datacontenttype`, and absent `subject`/`time`. So every event valid against
//! the schemas decodes, but not every event that decodes is valid against them.

use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::audit::AuditRecord;
use crate::envelope::{source_for_type, Event, CONTENT_TYPE};
use crate::lifecycle::{Alive, Governor, Provisioned, Shutdown, Startup, Upgraded};
use crate::machine::{Transition, WatcherState};
use crate::reaction::Reaction;
use crate::registration::Registration;
use crate::rpc::{RpcReply, RpcRequest};
use crate::{audit, lifecycle, machine, rpc};

/// Base of every schema `$id`: `<base><type>.json`, `<base>envelope.json`.
pub const SCHEMA_BASE_URL: &str = "https://chorus.dev/schemas/";

/// File name of the envelope schema.
pub const ENVELOPE_SCHEMA_FILE: &str = "envelope.json";

/// Every schema as (file name, schema): one `<type>.json` per entry of [`Event::TYPES`], then
/// `envelope.json`. This is exactly the content of `schemas/json/`.
pub fn json_schemas() -> Vec<(String, Value)> {
    let mut schemas: Vec<(String, Value)> =
        Event::TYPES.iter().map(|ty| (schema_file(ty), event_schema(ty).unwrap_or(Value::Null))).collect();
    schemas.push((ENVELOPE_SCHEMA_FILE.to_owned(), envelope_schema()));
    schemas
}

/// The file name of the schema of CloudEvents type `event_type`: `<type>.json`, with the
/// colons of Choria's registration protocol (`choria:registration:inventorycontent:1`)
/// spelled as dots, since some file systems refuse colons.
pub fn schema_file(event_type: &str) -> String {
    format!("{}.json", event_type.replace(':', "."))
}

/// The schema of the `data` document of CloudEvents type `event_type`, or `None` for a type
/// Chorus does not know.
pub fn event_schema(event_type: &str) -> Option<Value> {
    let mut schema = match event_type {
        Startup::PROTOCOL => generate::<Startup>(),
        Alive::PROTOCOL => generate::<Alive>(),
        Shutdown::PROTOCOL => generate::<Shutdown>(),
        Provisioned::PROTOCOL => generate::<Provisioned>(),
        Upgraded::PROTOCOL => generate::<Upgraded>(),
        Governor::PROTOCOL => generate::<Governor>(),
        Transition::PROTOCOL => generate::<Transition>(),
        RpcRequest::PROTOCOL => generate::<RpcRequest>(),
        RpcReply::PROTOCOL => generate::<RpcReply>(),
        AuditRecord::PROTOCOL => generate::<AuditRecord>(),
        Registration::PROTOCOL => generate::<Registration>(),
        Reaction::PROTOCOL => generate::<Reaction>(),
        other => {
            let watcher_type = other
                .strip_prefix("io.choria.machine.watcher.")?
                .strip_suffix(".v1.state")
                .filter(|t| WatcherState::TYPES.contains(t))?;
            let mut schema = generate::<WatcherState>();
            narrow_watcher(&mut schema, watcher_type)?;
            schema
        }
    };
    let map = schema.as_object_mut()?;
    let description = map.remove("description");
    let mut out = Map::new();
    out.insert("$schema".into(), map.remove("$schema").unwrap_or(Value::Null));
    out.insert("$id".into(), Value::String(format!("{SCHEMA_BASE_URL}{}", schema_file(event_type))));
    out.insert("title".into(), Value::String(event_type.to_owned()));
    map.remove("title");
    if let Some(description) = description {
        out.insert("description".into(), description);
    }
    out.extend(std::mem::take(map));
    // The protocol field is a string in Rust but a constant on the wire.
    let protocol = out.get_mut("properties")?.get_mut("protocol")?.as_object_mut()?;
    protocol.insert("const".into(), Value::String(event_type.to_owned()));
    Some(Value::Object(out))
}

/// The schema of the CloudEvents envelope Chorus writes and accepts (structured mode, JSON).
pub fn envelope_schema() -> Value {
    let sources = [
        lifecycle::SOURCE,
        machine::SOURCE,
        rpc::SOURCE,
        audit::SOURCE,
        crate::registration::SOURCE,
        crate::reaction::SOURCE,
    ];
    let type_source_rules: Vec<Value> = Event::TYPES
        .iter()
        .map(|ty| {
            json!({
                "if": { "properties": { "type": { "const": ty } }, "required": ["type"] },
                "then": { "properties": { "source": { "const": source_for_type(ty) } } }
            })
        })
        .collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("{SCHEMA_BASE_URL}{ENVELOPE_SCHEMA_FILE}"),
        "title": "Chorus event envelope",
        "description": "CloudEvents 1.0 structured-mode JSON envelope of every Chorus event, as Chorus writes it. `data` is the document described by `<type>.json`. Decoders also accept Choria's legacy bare lifecycle documents, which are not described here.",
        "type": "object",
        "properties": {
            "specversion": { "description": "CloudEvents version.", "const": "1.0" },
            "id": {
                "description": "Event id (UUIDv7 for Chorus events); the dedupe key. Equal to data.id for lifecycle events.",
                "type": "string",
                "minLength": 1
            },
            "type": { "description": "Event type; equal to data.protocol.", "enum": Event::TYPES },
            "source": { "description": "Event family.", "enum": sources },
            "datacontenttype": { "description": "Always JSON.", "const": CONTENT_TYPE },
            "subject": {
                "description": "Node identity the event is about; equal to the identity field of data.",
                "type": "string",
                "minLength": 1
            },
            "time": {
                "description": "When the event happened (RFC 3339, years 0000-9999).",
                "type": "string",
                "format": "date-time"
            },
            "data": { "description": "The event document.", "type": "object" },
            "seq": {
                "description": "Per-producer sequence, starting at 1; absent means unsequenced (Choria producers). Written as a number; a decimal string is accepted too.",
                "anyOf": [
                    { "type": "integer", "minimum": 1 },
                    { "type": "string", "pattern": "^[0-9]+$" }
                ]
            },
            "site": { "description": "Site where the event was produced.", "type": "string" },
            "sigkey": {
                "description": "Id of the key that signed the event (first 16 bytes of the SHA-256 of the public key, hex); present with sig.",
                "type": "string",
                "minLength": 1
            },
            "sig": {
                "description": "Signature (Ed25519, or P-256 r||s; standard base64) of the event without sig, sigkey and sigcred; see docs/SECURITY.md; present with sigkey.",
                "type": "string",
                "minLength": 1
            },
            "sigcred": {
                "description": "The signer's node credential (a JWS issued by a trusted issuer binding the key to the node); see docs/SECURITY.md.",
                "type": "string",
                "minLength": 1
            }
        },
        "required": ["specversion", "id", "type", "source", "data"],
        "dependentRequired": { "sig": ["sigkey"], "sigkey": ["sig"], "sigcred": ["sigkey", "sig"] },
        "allOf": type_source_rules
    })
}

fn generate<T: JsonSchema>() -> Value {
    let schema = SchemaGenerator::default().into_root_schema_for::<T>();
    schema.to_value()
}

/// Turns the all-watchers schema (common fields plus a `oneOf` over the watcher types) into
/// the flat schema of one watcher type, as Choria publishes one schema per watcher type.
fn narrow_watcher(schema: &mut Value, watcher_type: &str) -> Option<()> {
    let map = schema.as_object_mut()?;
    let variants = map.remove("oneOf")?;
    let defs = map.remove("$defs").unwrap_or(Value::Null);
    let variant = variants
        .as_array()?
        .iter()
        .find(|v| v.pointer("/properties/type/const").and_then(Value::as_str) == Some(watcher_type))?;
    let details = match variant.get("$ref").and_then(Value::as_str) {
        Some(reference) => defs.get(reference.strip_prefix("#/$defs/")?)?.clone(),
        None => variant.clone(),
    };

    let properties = map.get_mut("properties")?.as_object_mut()?;
    properties
        .insert("type".into(), json!({ "description": "Watcher type.", "type": "string", "const": watcher_type }));
    for (name, property) in details.get("properties")?.as_object()? {
        properties.insert(name.clone(), property.clone());
    }
    let required = map.get_mut("required")?.as_array_mut()?;
    required.push(Value::String("type".into()));
    for name in details.get("required").and_then(Value::as_array).into_iter().flatten() {
        required.push(name.clone());
    }
    // Types the details refer to (a metric watcher's sample), and what they refer to.
    let mut kept = Map::new();
    let mut pending = vec![details];
    while let Some(value) = pending.pop() {
        for name in references(&value) {
            if let (false, Some(def)) = (kept.contains_key(&name), defs.get(&name)) {
                kept.insert(name, def.clone());
                pending.push(def.clone());
            }
        }
    }
    if !kept.is_empty() {
        map.insert("$defs".into(), Value::Object(kept));
    }
    Some(())
}

/// The `$defs` names `value` refers to (`"$ref": "#/$defs/<name>"`), anywhere inside it.
fn references(value: &Value) -> Vec<String> {
    match value {
        Value::Object(map) => map
            .iter()
            .flat_map(|(k, v)| match (k.as_str(), v) {
                ("$ref", Value::String(r)) => r.strip_prefix("#/$defs/").map(str::to_owned).into_iter().collect(),
                _ => references(v),
            })
            .collect(),
        Value::Array(items) => items.iter().flat_map(references).collect(),
        _ => Vec::new(),
    }
}
