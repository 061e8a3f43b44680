package gmtrouter

// MethodName is what Selector.Method returns: the selection method's name in the router's
// configuration.
const MethodName = "gmtrouter"

// FallbackMethod is SelectionResult.Method when the service could not answer in time and
// the first candidate was chosen locally.
const FallbackMethod = "gmtrouter_fallback"

// ModelRef is one candidate model, as in the router's configuration.
type ModelRef struct {
	// Model is the model name the gateway routes to. Must not be blank.
	Model string
	// LoRAName is an optional LoRA adapter served under Model.
	LoRAName string
	// Weight is the router's static weight for this model (not sent: the service learns
	// its own scores).
	Weight float64
}

// SelectionContext is one routing decision to make.
type SelectionContext struct {
	// Query is the user's query text. Either Query or QueryEmbedding is required.
	Query string
	// QueryEmbedding is the router's own embedding of Query, if it already made one; it is
	// passed through and the service does not embed Query again. It must have the service's
	// embedding dimension (384 for all-MiniLM-L6-v2).
	QueryEmbedding []float32
	// ConversationHistory holds earlier messages of this conversation, oldest first.
	ConversationHistory []string
	// DecisionName and CategoryName name the router's decision (not sent).
	DecisionName string
	CategoryName string
	// CandidateModels are the models to choose from; at least one, none blank.
	CandidateModels []ModelRef
	// CostWeight and QualityWeight (0..1) are the router's trade-off knobs (not sent).
	CostWeight    float64
	QualityWeight float64
	// UserID is the end user's stable id, from a trusted authentication header.
	UserID string
	// SessionID is the conversation id (recorded turns are chained by Feedback.TurnIndex).
	SessionID string
}

// SelectionResult is the decision.
type SelectionResult struct {
	// SelectedModel is always one of the candidates' Model names.
	SelectedModel string
	// LoRAName is the chosen candidate's LoRA adapter, if any.
	LoRAName string
	// Score is the chosen model's score (higher is better).
	Score float64
	// Confidence in [0, 1] that the chosen model beats the runner-up; 0 for a fallback.
	Confidence float64
	// Method says how the decision was made: the service's method ("gmtrouter",
	// "gmtrouter_cold_start", "bt_prior", "bt_prior_cold_start", "degraded_*") or
	// FallbackMethod.
	Method string
	// Reasoning is a human-readable explanation of the choice.
	Reasoning string
	// AllScores holds every candidate's score keyed by model name (empty for a fallback).
	AllScores map[string]float64
	// InteractionID is the service's id of this decision ("" for a fallback).
	InteractionID string
	// ModelVersion is the version of the service's scoring model ("" for a fallback).
	ModelVersion string
}

// Feedback is what the router learned about a response after the fact.
type Feedback struct {
	// Query is the query text the models answered. Required.
	Query string
	// Response is the response text (optional).
	Response string
	// WinnerModel and LoserModel: at least one is required and they must differ. Both set
	// records a pairwise comparison; only WinnerModel records a positive rating of it, only
	// LoserModel a negative rating.
	WinnerModel string
	LoserModel  string
	// Tie marks a draw between WinnerModel and LoserModel (both required then).
	Tie bool
	// DecisionName names the router's decision (not sent).
	DecisionName string
	// Timestamp is when the interaction happened, unix seconds; now when 0.
	Timestamp int64
	// UserID is required. SessionID (or ConversationID when SessionID is empty) names the
	// conversation.
	UserID         string
	SessionID      string
	ConversationID string
	// TurnIndex is the 0-based position of Query's turn in its conversation (e.g. the number
	// of earlier user messages). The service links each turn to the previous turn of its
	// session by this index (the method's turn→previous-turn edges): feedback that leaves it
	// 0 for every turn of a conversation is stored, but its turns are not chained.
	TurnIndex uint32
	// FeedbackType is the router's label, e.g. "satisfied", "need_clarification",
	// "wrong_answer", "want_different" (not sent).
	FeedbackType string
	// Confidence in [0, 1] (validated, not sent).
	Confidence float64
}

// ModelScore is one entry of a user's ranking, best first.
type ModelScore struct {
	Model string
	Score float64
}
