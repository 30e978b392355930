package clock

import (
	"testing"
	"time"
)

func TestFakeTimer(t *testing.T) {
	c := NewFake()
	tm := c.NewTimer()
	start := c.Now()
	tm.ResetAt(start.Add(time.Second))
	if c.Armed() != 1 {
		t.Fatalf("armed %d, want 1", c.Armed())
	}
	c.Advance(999 * time.Millisecond)
	select {
	case <-tm.C():
		t.Fatal("fired early")
	default:
	}
	c.Advance(time.Millisecond)
	select {
	case at := <-tm.C():
		if !at.Equal(start.Add(time.Second)) {
			t.Fatalf("fired at %v", at)
		}
	default:
		t.Fatal("did not fire when due")
	}
	tm.ResetAt(c.Now().Add(-time.Second)) // in the past: fires at once
	select {
	case <-tm.C():
	default:
		t.Fatal("a timer set in the past did not fire")
	}
	tm.ResetAt(c.Now().Add(time.Second))
	tm.Stop()
	c.Advance(time.Hour)
	select {
	case <-tm.C():
		t.Fatal("a stopped timer fired")
	default:
	}
}

func TestRealTimer(t *testing.T) {
	tm := Real{}.NewTimer()
	tm.ResetAt(time.Now().Add(10 * time.Millisecond))
	select {
	case <-tm.C():
	case <-time.After(10 * time.Second):
		t.Fatal("real timer did not fire")
	}
}
