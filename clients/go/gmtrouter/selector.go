package gmtrouter

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	routerv1 "github.com/gmtrouter/gmtrouter/protos/gen/go/gmtrouter/v1"
)

// ErrInvalidRequest wraps every validation error (a caller bug, not an outage).
var ErrInvalidRequest = errors.New("gmtrouter: invalid request")

// RecordResponse carries an idempotency key, so retrying it on UNAVAILABLE is safe.
// round_robin spreads calls over every address the target resolves to: with a headless
// Kubernetes Service ("dns:///gmtrouter-headless.ns.svc.cluster.local:50051") that is every
// ready replica; a ClusterIP Service name resolves to one address, as with pick_first. The
// server's max_connection_age makes clients reconnect, and so re-resolve, periodically.
const serviceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [{
    "name": [{"service": "gmtrouter.v1.RouterService", "method": "RecordResponse"}],
    "retryPolicy": {
      "maxAttempts": 3,
      "initialBackoff": "0.05s",
      "maxBackoff": "0.5s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}`

// Stats counts a Selector's calls since it was made.
type Stats struct {
	Selects, Fallbacks, Feedbacks, FeedbackErrors, DuplicateFeedbacks uint64
}

// Selector implements the Go routers' selector shape by calling the gmtrouter service. It is
// safe for concurrent use.
type Selector struct {
	opts     options
	conn     *grpc.ClientConn // nil when the caller owns the connection
	client   routerv1.RouterServiceClient
	selects  atomic.Uint64
	fallback atomic.Uint64
	feedback atomic.Uint64
	fbErrors atomic.Uint64
	dupes    atomic.Uint64
}

// New makes a Selector for the service at target (e.g. "gmtrouter.ns.svc:50051" or
// "dns:///gmtrouter:50051"). It does not wait for a connection: a service that is down
// only makes Select fall back. Close it when done.
func New(target string, opts ...Option) (*Selector, error) {
	o := defaultOptions()
	for _, fn := range opts {
		fn(&o)
	}
	dial := []grpc.DialOption{grpc.WithDefaultServiceConfig(serviceConfig)}
	if o.tls != nil {
		creds, err := o.tls.credentials()
		if err != nil {
			return nil, err
		}
		dial = append(dial, grpc.WithTransportCredentials(creds))
	} else {
		dial = append(dial, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if o.token != nil {
		if o.tls == nil && !o.insecureToken {
			return nil, errors.New("gmtrouter: a bearer token needs WithTLS (or WithInsecureToken)")
		}
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{src: o.token, requireTLS: o.tls != nil}))
	}
	dial = append(dial, o.dialOptions...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("gmtrouter: %w", err)
	}
	return &Selector{opts: o, conn: conn, client: routerv1.NewRouterServiceClient(conn)}, nil
}

// NewFromConn makes a Selector on a connection the caller owns (and closes). Only the
// deadline, user, logger and backoff options apply.
func NewFromConn(conn grpc.ClientConnInterface, opts ...Option) *Selector {
	o := defaultOptions()
	for _, fn := range opts {
		fn(&o)
	}
	return &Selector{opts: o, client: routerv1.NewRouterServiceClient(conn)}
}

// Close closes the connection New opened.
func (s *Selector) Close() error {
	if s.conn == nil {
		return nil
	}
	return s.conn.Close()
}

// Method is the selection method's name, "gmtrouter".
func (s *Selector) Method() string { return MethodName }

// Stats returns the call counters.
func (s *Selector) Stats() Stats {
	return Stats{
		Selects: s.selects.Load(), Fallbacks: s.fallback.Load(), Feedbacks: s.feedback.Load(),
		FeedbackErrors: s.fbErrors.Load(), DuplicateFeedbacks: s.dupes.Load(),
	}
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidRequest, fmt.Sprintf(format, args...))
}

func checkCandidates(cands []ModelRef) error {
	if len(cands) == 0 {
		return invalid("no candidate models")
	}
	for i, c := range cands {
		if strings.TrimSpace(c.Model) == "" {
			return invalid("candidate %d has a blank model name", i)
		}
	}
	return nil
}

// Select asks the service for the best candidate for this user and query, within the select
// deadline. A request without candidates, or with a blank model name, is an
// ErrInvalidRequest. When the service is unavailable, times out, fails, or answers a model
// that is not a candidate, the result is the first candidate with Method FallbackMethod and
// a nil error; so is an INVALID_ARGUMENT from the service (e.g. an embedding of the wrong
// dimension), with the service's message in Reasoning.
func (s *Selector) Select(ctx context.Context, sc *SelectionContext) (*SelectionResult, error) {
	if sc == nil {
		return nil, invalid("nil SelectionContext")
	}
	if err := checkCandidates(sc.CandidateModels); err != nil {
		return nil, err
	}
	s.selects.Add(1)
	user := sc.UserID
	if strings.TrimSpace(user) == "" {
		user = s.opts.anonymousUser
	}
	if strings.TrimSpace(user) == "" {
		return s.fallbackResult(sc, "no user id on the request"), nil
	}
	req := &routerv1.SelectRequest{
		UserId:              user,
		SessionId:           sc.SessionID,
		Query:               sc.Query,
		QueryEmbedding:      sc.QueryEmbedding,
		ConversationHistory: sc.ConversationHistory,
		CandidateModels:     toProtoCandidates(sc.CandidateModels),
	}
	cctx, cancel := context.WithTimeout(ctx, s.opts.selectTimeout)
	defer cancel()
	start := time.Now()
	resp, err := s.client.Select(cctx, req)
	if err != nil {
		st := status.Convert(err)
		why := fmt.Sprintf("gmtrouter service %s after %s: %s", st.Code(), time.Since(start).Round(time.Millisecond), st.Message())
		if st.Code() == codes.DeadlineExceeded {
			why = fmt.Sprintf("gmtrouter service did not answer within %s", s.opts.selectTimeout)
		}
		return s.fallbackResult(sc, why), nil
	}
	cand, ok := findCandidate(sc.CandidateModels, resp.GetSelectedModel())
	if !ok {
		return s.fallbackResult(sc, fmt.Sprintf("gmtrouter service answered %q, which is not a candidate", resp.GetSelectedModel())), nil
	}
	lora := resp.GetLoraName()
	if lora == "" {
		lora = cand.LoRAName
	}
	scores := make(map[string]float64, len(resp.GetAllScores()))
	for m, v := range resp.GetAllScores() {
		scores[m] = v
	}
	return &SelectionResult{
		SelectedModel: cand.Model,
		LoRAName:      lora,
		Score:         resp.GetScore(),
		Confidence:    resp.GetConfidence(),
		Method:        resp.GetMethod(),
		Reasoning:     resp.GetReasoning(),
		AllScores:     scores,
		InteractionID: resp.GetInteractionId(),
		ModelVersion:  resp.GetModelVersion(),
	}, nil
}

func (s *Selector) fallbackResult(sc *SelectionContext, why string) *SelectionResult {
	s.fallback.Add(1)
	first := sc.CandidateModels[0]
	s.opts.logger.Warn("gmtrouter fallback", "reason", why, "model", first.Model, "user_id", sc.UserID)
	return &SelectionResult{
		SelectedModel: first.Model,
		LoRAName:      first.LoRAName,
		Method:        FallbackMethod,
		Reasoning:     "fallback to the first candidate: " + why,
		AllScores:     map[string]float64{},
	}
}

// findCandidate matches the service's answer by model name, then by LoRA name.
func findCandidate(cands []ModelRef, name string) (ModelRef, bool) {
	if name == "" {
		return ModelRef{}, false
	}
	for _, c := range cands {
		if c.Model == name {
			return c, true
		}
	}
	for _, c := range cands {
		if c.LoRAName != "" && c.LoRAName == name {
			return c, true
		}
	}
	return ModelRef{}, false
}

func toProtoCandidates(cands []ModelRef) []*routerv1.CandidateModel {
	out := make([]*routerv1.CandidateModel, len(cands))
	for i, c := range cands {
		out[i] = &routerv1.CandidateModel{Model: c.Model, LoraName: c.LoRAName}
	}
	return out
}
