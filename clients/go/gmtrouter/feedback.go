package gmtrouter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	routerv1 "github.com/gmtrouter/gmtrouter/protos/gen/go/gmtrouter/v1"
)

// ValidateFeedback applies the routers' feedback rules: a user id, the query text, a winner
// or a loser, winner ≠ loser, a tie only between two models, confidence in [0, 1].
func ValidateFeedback(fb *Feedback) error {
	if fb == nil {
		return invalid("nil Feedback")
	}
	w, l := strings.TrimSpace(fb.WinnerModel), strings.TrimSpace(fb.LoserModel)
	switch {
	case w == "" && l == "":
		return invalid("feedback needs a winner or a loser model")
	case w != "" && w == l:
		return invalid("winner and loser are both %q", w)
	case fb.Tie && (w == "" || l == ""):
		return invalid("a tie needs both a winner and a loser model")
	case math.IsNaN(fb.Confidence) || fb.Confidence < 0 || fb.Confidence > 1:
		return invalid("confidence %v is outside [0, 1]", fb.Confidence)
	case strings.TrimSpace(fb.Query) == "":
		return invalid("feedback needs the query text")
	case fb.Timestamp < 0:
		return invalid("negative timestamp %d", fb.Timestamp)
	}
	return nil
}

// FeedbackKey is the idempotency key UpdateFeedback sends: a hash of every field of fb,
// Timestamp included. The same feedback sent twice (a retry) is recorded once; set
// Timestamp to make that hold across calls, since a zero Timestamp becomes "now" (to the
// second) before the key is made.
func FeedbackKey(fb *Feedback) string {
	h := sha256.New()
	for _, part := range []string{
		"gmtrouter-feedback-v1", fb.UserID, fb.SessionID, fb.ConversationID, fb.Query,
		fb.Response, fb.WinnerModel, fb.LoserModel, strconv.FormatBool(fb.Tie),
		fb.DecisionName, fb.FeedbackType, strconv.FormatInt(fb.Timestamp, 10),
		strconv.FormatFloat(fb.Confidence, 'g', -1, 64),
	} {
		h.Write([]byte(strconv.Itoa(len(part))))
		h.Write([]byte{':'})
		h.Write([]byte(part))
	}
	if fb.TurnIndex != 0 { // keys of turn-0 feedback are those of clients before TurnIndex
		h.Write([]byte("turn:" + strconv.FormatUint(uint64(fb.TurnIndex), 10)))
	}
	return "fb-" + hex.EncodeToString(h.Sum(nil))[:40]
}

// feedbackRequest maps Feedback to RecordResponse: winner and loser → a comparison (tie
// kept); only a winner → rating 1 on [0, 1] for it; only a loser → rating 0 for it.
func feedbackRequest(fb *Feedback, user string) *routerv1.RecordResponseRequest {
	session := fb.SessionID
	if session == "" {
		session = fb.ConversationID
	}
	req := &routerv1.RecordResponseRequest{
		UserId:         user,
		SessionId:      session,
		TurnIndex:      fb.TurnIndex,
		Query:          fb.Query,
		Response:       fb.Response,
		IdempotencyKey: FeedbackKey(fb),
		Timestamp:      timestamppb.New(time.Unix(fb.Timestamp, 0)),
	}
	w, l := strings.TrimSpace(fb.WinnerModel), strings.TrimSpace(fb.LoserModel)
	switch {
	case w != "" && l != "":
		req.Model = w
		req.Feedback = &routerv1.RecordResponseRequest_Comparison{
			Comparison: &routerv1.Comparison{WinnerModel: w, LoserModel: l, Tie: fb.Tie},
		}
	case w != "":
		req.Model = w
		req.Feedback = &routerv1.RecordResponseRequest_Rating{
			Rating: &routerv1.Rating{Value: 1, ScaleMin: 0, ScaleMax: 1},
		}
	default:
		req.Model = l
		req.Feedback = &routerv1.RecordResponseRequest_Rating{
			Rating: &routerv1.Rating{Value: 0, ScaleMin: 0, ScaleMax: 1},
		}
	}
	return req
}

// UpdateFeedback records the feedback with the service (RecordResponse) within the feedback
// deadline, retrying UNAVAILABLE; a duplicate (same idempotency key) is not an error.
// Invalid feedback is an ErrInvalidRequest; a service failure is returned as the gRPC error.
func (s *Selector) UpdateFeedback(ctx context.Context, fb *Feedback) error {
	if err := ValidateFeedback(fb); err != nil {
		return err
	}
	user := fb.UserID
	if strings.TrimSpace(user) == "" {
		user = s.opts.anonymousUser
	}
	if strings.TrimSpace(user) == "" {
		return invalid("feedback needs a user id")
	}
	c := *fb
	if c.Timestamp == 0 {
		c.Timestamp = time.Now().Unix()
	}
	c.UserID = user
	s.feedback.Add(1)
	cctx, cancel := context.WithTimeout(ctx, s.opts.feedbackTimeout)
	defer cancel()
	resp, err := s.client.RecordResponse(cctx, feedbackRequest(&c, user))
	if err != nil {
		s.fbErrors.Add(1)
		s.opts.logger.Warn("gmtrouter feedback failed", "error", err, "user_id", user)
		return fmt.Errorf("gmtrouter: recording feedback: %w", err)
	}
	if resp.GetDuplicate() {
		s.dupes.Add(1)
	}
	return nil
}
