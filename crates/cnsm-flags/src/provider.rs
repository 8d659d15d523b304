//! The two OpenFeature providers: [`FlagdFileProvider`] (the embedded default: a flagd flag
//! file, reloaded when it changes) and [`InMemoryProvider`] (flags defined in code, for tests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use cnsm_core::flags::FlagValueType;
use open_feature::provider::{
    FeatureProvider, ProviderMetadata, ProviderStatus, ResolutionDetails,
};
use open_feature::{
    EvaluationContext, EvaluationError, EvaluationErrorCode, EvaluationReason, EvaluationResult,
    FlagMetadata, StructValue,
};
use serde_json::{Map, Value as Json};

use crate::model::{FlagFileError, FlagSet, Resolution, of_value};

/// The provider name of the embedded flagd-format provider.
pub const FLAGD_FILE_PROVIDER_NAME: &str = "cnsm-flagd-file";
/// The provider name of the in-memory provider.
pub const IN_MEMORY_PROVIDER_NAME: &str = "cnsm-in-memory";
/// How often the file provider looks at the file's modification time.
pub const RELOAD_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

/// A source of flag resolutions that also knows flag types and its own health.
pub trait FlagSource: Send + Sync + 'static {
    fn resolve(
        &self,
        key: &str,
        value_type: FlagValueType,
        context: &EvaluationContext,
    ) -> Result<Resolution, EvaluationError>;

    /// The type of a flag's values, when the source knows the flag.
    fn value_type(&self, key: &str) -> Option<FlagValueType>;

    /// The source's current problem, if any (a flag file that failed to load).
    fn error(&self) -> Option<String> {
        None
    }

    fn name(&self) -> &str;
}

// ------------------------------------------------------------------------------------------
// flagd file provider

/// Evaluates a flagd flag file in-process and reloads it when it changes (the modification
/// time and length are polled by a background thread; no file-watcher dependency). A reload
/// swaps an `Arc`, so evaluations in flight finish on the set they started with and none is
/// dropped. A file that fails to load keeps the last good set and reports the error through
/// [`FlagdFileProvider::error`]. Cheap to clone; the thread stops with the last clone.
#[derive(Clone)]
pub struct FlagdFileProvider {
    state: Arc<FileState>,
    metadata: ProviderMetadata,
}

impl std::fmt::Debug for FlagdFileProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagdFileProvider")
            .field("path", &self.state.path)
            .finish_non_exhaustive()
    }
}

struct FileState {
    path: PathBuf,
    set: RwLock<Arc<FlagSet>>,
    error: Mutex<Option<String>>,
    /// Modification time and length of the file last looked at.
    seen: Mutex<Option<(SystemTime, u64)>>,
    n_loads: AtomicU64,
}

impl FileState {
    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Reads and parses the file; on success swaps the set in, else keeps the old one.
    fn load(&self) -> Result<(), FlagFileError> {
        let stamp = self.stamp();
        let result = std::fs::read_to_string(&self.path)
            .map_err(|e| FlagFileError::Read {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })
            .and_then(|text| FlagSet::parse(&text));
        if let Ok(mut seen) = self.seen.lock() {
            *seen = stamp;
        }
        match result {
            Ok(set) => {
                if let Ok(mut current) = self.set.write() {
                    *current = Arc::new(set);
                }
                if let Ok(mut error) = self.error.lock() {
                    *error = None;
                }
                self.n_loads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %self.path.display(), "flag file loaded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "flag file refused; keeping the last good flags");
                if let Ok(mut error) = self.error.lock() {
                    *error = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    fn reload_if_changed(&self) {
        let stamp = self.stamp();
        let changed = self.seen.lock().map(|seen| *seen != stamp).unwrap_or(true);
        if changed {
            let _ = self.load();
        }
    }
}

impl FlagdFileProvider {
    /// Loads `path` (it must load the first time) and polls it every second for changes.
    pub fn open(path: impl AsRef<Path>) -> Result<FlagdFileProvider, FlagFileError> {
        FlagdFileProvider::open_with_interval(path, RELOAD_INTERVAL_DEFAULT)
    }

    /// Like [`FlagdFileProvider::open`] with another polling interval.
    pub fn open_with_interval(
        path: impl AsRef<Path>,
        interval: Duration,
    ) -> Result<FlagdFileProvider, FlagFileError> {
        let state = Arc::new(FileState {
            path: path.as_ref().to_path_buf(),
            set: RwLock::new(Arc::new(FlagSet::default())),
            error: Mutex::new(None),
            seen: Mutex::new(None),
            n_loads: AtomicU64::new(0),
        });
        state.load()?;
        let weak: Weak<FileState> = Arc::downgrade(&state);
        std::thread::Builder::new()
            .name("cnsm-flags-reload".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    match weak.upgrade() {
                        Some(state) => state.reload_if_changed(),
                        None => break,
                    }
                }
            })
            .map_err(|e| FlagFileError::Read {
                path: path.as_ref().display().to_string(),
                message: format!("cannot start the reload thread: {e}"),
            })?;
        Ok(FlagdFileProvider {
            state,
            metadata: ProviderMetadata::new(FLAGD_FILE_PROVIDER_NAME),
        })
    }

    /// The flag set now in use.
    pub fn flags(&self) -> Arc<FlagSet> {
        self.state
            .set
            .read()
            .map(|s| Arc::clone(&s))
            .unwrap_or_default()
    }

    /// Checks the file now instead of waiting for the poll (tests, `SIGHUP`-style reloads).
    pub fn reload(&self) -> Result<(), FlagFileError> {
        self.state.load()
    }

    /// How many times a flag set was loaded successfully.
    pub fn n_loads(&self) -> u64 {
        self.state.n_loads.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.state.path
    }
}

impl FlagSource for FlagdFileProvider {
    fn resolve(
        &self,
        key: &str,
        value_type: FlagValueType,
        context: &EvaluationContext,
    ) -> Result<Resolution, EvaluationError> {
        self.flags().resolve(key, value_type, context)
    }

    fn value_type(&self, key: &str) -> Option<FlagValueType> {
        self.flags().value_type(key)
    }

    fn error(&self) -> Option<String> {
        self.state.error.lock().ok().and_then(|e| e.clone())
    }

    fn name(&self) -> &str {
        &self.metadata.name
    }
}

// ------------------------------------------------------------------------------------------
// in-memory provider

/// Picks a variant from the context; `None` (or an empty name) means "use the default".
pub type ContextEvaluator = Arc<dyn Fn(&EvaluationContext) -> Option<String> + Send + Sync>;

/// One flag of the [`InMemoryProvider`].
#[derive(Clone, Default)]
pub struct MemoryFlag {
    pub variants: Map<String, Json>,
    pub default_variant: Option<String>,
    pub disabled: bool,
    pub context_evaluator: Option<ContextEvaluator>,
    pub metadata: Map<String, Json>,
}

impl MemoryFlag {
    /// A boolean flag with variants `on`/`off` that resolves to `on` when `on` is true.
    pub fn boolean(on: bool) -> MemoryFlag {
        let mut variants = Map::new();
        variants.insert("on".into(), Json::Bool(true));
        variants.insert("off".into(), Json::Bool(false));
        MemoryFlag {
            variants,
            default_variant: Some(if on { "on" } else { "off" }.into()),
            ..MemoryFlag::default()
        }
    }
}

/// Flags defined in code, for tests. Can be switched into a failing state to check how gates
/// behave when the provider errs.
#[derive(Clone)]
pub struct InMemoryProvider {
    state: Arc<RwLock<MemoryState>>,
    metadata: ProviderMetadata,
}

#[derive(Default)]
struct MemoryState {
    flags: HashMap<String, MemoryFlag>,
    failure: Option<EvaluationError>,
}

impl std::fmt::Debug for InMemoryProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryProvider").finish_non_exhaustive()
    }
}

impl Default for InMemoryProvider {
    fn default() -> InMemoryProvider {
        InMemoryProvider {
            state: Arc::default(),
            metadata: ProviderMetadata::new(IN_MEMORY_PROVIDER_NAME),
        }
    }
}

impl InMemoryProvider {
    pub fn new() -> InMemoryProvider {
        InMemoryProvider::default()
    }

    /// Adds or replaces a flag.
    pub fn set_flag(&self, key: impl Into<String>, flag: MemoryFlag) {
        if let Ok(mut s) = self.state.write() {
            s.flags.insert(key.into(), flag);
        }
    }

    pub fn remove_flag(&self, key: &str) {
        if let Ok(mut s) = self.state.write() {
            s.flags.remove(key);
        }
    }

    /// Makes every evaluation fail with `GENERAL` and `message` (`None` heals it).
    pub fn set_failure(&self, message: Option<&str>) {
        if let Ok(mut s) = self.state.write() {
            s.failure = message.map(|m| {
                EvaluationError::builder()
                    .code(EvaluationErrorCode::General("GENERAL".into()))
                    .message(m.to_owned())
                    .build()
            });
        }
    }
}

impl FlagSource for InMemoryProvider {
    fn resolve(
        &self,
        key: &str,
        value_type: FlagValueType,
        context: &EvaluationContext,
    ) -> Result<Resolution, EvaluationError> {
        let state = self.state.read().map_err(|_| {
            EvaluationError::builder()
                .code(EvaluationErrorCode::General("GENERAL".into()))
                .message("in-memory provider lock poisoned")
                .build()
        })?;
        if let Some(failure) = &state.failure {
            return Err(failure.clone());
        }
        let Some(flag) = state.flags.get(key) else {
            return Err(EvaluationError::builder()
                .code(EvaluationErrorCode::FlagNotFound)
                .message(format!("flag '{key}' is not defined"))
                .build());
        };
        let metadata = flag.metadata.clone();
        if flag.disabled {
            return Ok(Resolution {
                value: None,
                variant: None,
                reason: EvaluationReason::Disabled,
                metadata,
            });
        }
        let targeted = flag
            .context_evaluator
            .as_ref()
            .and_then(|f| f(context))
            .filter(|v| !v.is_empty());
        let (variant, reason) = match (targeted, &flag.context_evaluator) {
            (Some(v), _) => (Some(v), EvaluationReason::TargetingMatch),
            (None, Some(_)) => (flag.default_variant.clone(), EvaluationReason::Default),
            (None, None) => (flag.default_variant.clone(), EvaluationReason::Static),
        };
        let Some(variant) = variant else {
            return Ok(Resolution {
                value: None,
                variant: None,
                reason: EvaluationReason::Default,
                metadata,
            });
        };
        let Some(value) = flag.variants.get(&variant) else {
            return Err(EvaluationError::builder()
                .code(EvaluationErrorCode::General("GENERAL".into()))
                .message(format!("flag '{key}': variant '{variant}' is not defined"))
                .build());
        };
        if !crate::model::type_matches(value, value_type) {
            return Err(EvaluationError::builder()
                .code(EvaluationErrorCode::TypeMismatch)
                .message(format!(
                    "flag '{key}' has a value of another type than {value_type:?}"
                ))
                .build());
        }
        Ok(Resolution {
            value: Some(value.clone()),
            variant: Some(variant),
            reason,
            metadata,
        })
    }

    fn value_type(&self, key: &str) -> Option<FlagValueType> {
        let state = self.state.read().ok()?;
        let flag = state.flags.get(key)?;
        flag.variants.values().next().map(crate::model::type_of)
    }

    fn name(&self) -> &str {
        &self.metadata.name
    }
}

// ------------------------------------------------------------------------------------------
// OpenFeature provider glue

fn flag_metadata(map: &Map<String, Json>) -> Option<FlagMetadata> {
    if map.is_empty() {
        return None;
    }
    let mut out = FlagMetadata::default();
    for (k, v) in map {
        match v {
            Json::Bool(b) => out.add_value(k.clone(), *b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => out.add_value(k.clone(), i),
                None => out.add_value(k.clone(), n.as_f64().unwrap_or(0.0)),
            },
            Json::String(s) => out.add_value(k.clone(), s.clone()),
            _ => {}
        }
    }
    Some(out)
}

/// Turns a resolution into OpenFeature resolution details. A value the caller must default
/// (disabled flag, no default variant) is sent as `T::default()` with no variant; the reason
/// (`DISABLED` or `DEFAULT`) tells the caller to use its own default.
fn details<T: Default>(
    resolution: Resolution,
    convert: impl Fn(&Json) -> Option<T>,
) -> EvaluationResult<ResolutionDetails<T>> {
    let value = match &resolution.value {
        None => T::default(),
        Some(v) => convert(v).ok_or_else(|| {
            EvaluationError::builder()
                .code(EvaluationErrorCode::TypeMismatch)
                .message("the flag's value has another type")
                .build()
        })?,
    };
    Ok(ResolutionDetails {
        value,
        variant: resolution.variant,
        reason: Some(resolution.reason),
        flag_metadata: flag_metadata(&resolution.metadata),
    })
}

macro_rules! feature_provider {
    ($ty:ty) => {
        #[open_feature::async_trait]
        impl FeatureProvider for $ty {
            fn status(&self) -> ProviderStatus {
                ProviderStatus::Ready
            }

            fn metadata(&self) -> &ProviderMetadata {
                &self.metadata
            }

            async fn resolve_bool_value(
                &self,
                key: &str,
                context: &EvaluationContext,
            ) -> EvaluationResult<ResolutionDetails<bool>> {
                details(
                    self.resolve(key, FlagValueType::Bool, context)?,
                    Json::as_bool,
                )
            }

            async fn resolve_int_value(
                &self,
                key: &str,
                context: &EvaluationContext,
            ) -> EvaluationResult<ResolutionDetails<i64>> {
                details(
                    self.resolve(key, FlagValueType::Int, context)?,
                    Json::as_i64,
                )
            }

            async fn resolve_float_value(
                &self,
                key: &str,
                context: &EvaluationContext,
            ) -> EvaluationResult<ResolutionDetails<f64>> {
                details(
                    self.resolve(key, FlagValueType::Float, context)?,
                    Json::as_f64,
                )
            }

            async fn resolve_string_value(
                &self,
                key: &str,
                context: &EvaluationContext,
            ) -> EvaluationResult<ResolutionDetails<String>> {
                details(self.resolve(key, FlagValueType::String, context)?, |v| {
                    v.as_str().map(str::to_owned)
                })
            }

            async fn resolve_struct_value(
                &self,
                key: &str,
                context: &EvaluationContext,
            ) -> EvaluationResult<ResolutionDetails<StructValue>> {
                details(
                    self.resolve(key, FlagValueType::Object, context)?,
                    |v| match of_value(v) {
                        Some(open_feature::Value::Struct(s)) => Some(s),
                        _ => None,
                    },
                )
            }
        }
    };
}

feature_provider!(FlagdFileProvider);
feature_provider!(InMemoryProvider);
