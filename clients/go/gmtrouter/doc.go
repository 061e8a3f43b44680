// Package gmtrouter is a Go client for the gmtrouter personalized routing service, shaped
// like the model-selector interface of Go LLM routers (vLLM Semantic Router's
// pkg/selection): Select, UpdateFeedback and Method.
//
// A Selector calls the service over gRPC (gmtrouter.v1.RouterService) with a short deadline
// on every call. When the service is unavailable, slow or broken, Select answers with the
// first candidate model (Method "gmtrouter_fallback", Reasoning says why) and a nil error,
// so a router never hangs on its routing step. UpdateFeedback maps the router's feedback to
// RecordResponse with a deterministic idempotency key, so retries are never counted twice.
// A PreferenceCache follows StreamPreferences in the background (over several streams of at
// most WithMaxStreamUsers user ids each) and keeps each followed
// user's latest ranking of the candidate models in memory.
//
// What the service contract has no field for (and is therefore not sent): ModelRef.Weight,
// SelectionContext.DecisionName, CategoryName, CostWeight and QualityWeight, and
// Feedback.DecisionName, FeedbackType and Confidence (validated, and part of the
// idempotency key, but not transmitted).
package gmtrouter
