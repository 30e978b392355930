package health

import (
	"errors"
	"testing"
	"time"
)

func TestStateMachine(t *testing.T) {
	errDown := errors.New("down")
	// Results are written as a string: 'S' success, 'F' failure. want is
	// the state after each result ('H' healthy, 'U' unhealthy) and changes
	// marks where a change is reported ('^') or not ('.').
	tests := []struct {
		name       string
		rise, fall int
		carry      bool // healthy while pending (a restarted target)
		results    string
		want       string
		changes    string
	}{
		{"first success decides at once", 3, 3, false, "S", "H", "^"},
		{"first failure decides at once", 3, 3, false, "F", "U", "^"},
		{"rise 2 after a first failure", 2, 3, false, "FSS", "UUH", "^.^"},
		{"fall 3 after a first success", 2, 3, false, "SFFF", "HHHU", "^..^"},
		{"a success resets the failure run", 2, 3, false, "SFFSFFF", "HHHHHHU", "^.....^"},
		{"a failure resets the success run", 3, 2, false, "FSSFSSS", "UUUUUUH", "^.....^"},
		{"flapping never flips with rise 2 fall 2 (from healthy)", 2, 2, false, "SFSFSFSF", "HHHHHHHH", "^......."},
		{"flapping never flips with rise 2 fall 2 (from unhealthy)", 2, 2, false, "FSFSFSFS", "UUUUUUUU", "^......."},
		{"rise 1 fall 1 follows every result", 1, 1, false, "SFSF", "HUHU", "^^^^"},
		{"restarted healthy target: first failure decides", 2, 3, true, "FSS", "UUH", "^.^"},
		{"restarted healthy target: first success is still a change (pending ends)", 2, 3, true, "SF", "HH", "^."},
		{"rise 0 is taken as 1", 0, 0, false, "FSF", "UHU", "^^^"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := newState(tt.carry)
			if !st.pending || st.healthy != tt.carry {
				t.Fatalf("new state = %+v, want pending with healthy=%v", st, tt.carry)
			}
			now := time.Unix(1000, 0)
			var gotState, gotChanges []byte
			for i, r := range tt.results {
				now = now.Add(time.Second)
				var err error
				if r == 'F' {
					err = errDown
				}
				changed := st.observe(err, tt.rise, tt.fall, now)
				if st.pending {
					t.Fatalf("still pending after result %d", i)
				}
				gotState = append(gotState, map[bool]byte{true: 'H', false: 'U'}[st.healthy])
				gotChanges = append(gotChanges, map[bool]byte{true: '^', false: '.'}[changed])
				if changed && !st.lastTransition.Equal(now) {
					t.Errorf("result %d: lastTransition %v, want %v", i, st.lastTransition, now)
				}
				if st.lastErr != err {
					t.Errorf("result %d: lastErr %v for err %v", i, st.lastErr, err)
				}
			}
			if string(gotState) != tt.want || string(gotChanges) != tt.changes {
				t.Errorf("results %s: states %s changes %s, want %s %s", tt.results, gotState, gotChanges, tt.want, tt.changes)
			}
		})
	}
}

func TestStateCounts(t *testing.T) {
	st := newState(false)
	now := time.Unix(0, 0)
	for _, err := range []error{nil, nil, errors.New("x"), errors.New("y")} {
		st.observe(err, 2, 3, now)
	}
	if st.successes != 0 || st.failures != 2 || st.lastErr == nil || st.lastErr.Error() != "y" {
		t.Errorf("counts = %d successes %d failures, lastErr %v; want 0, 2, \"y\"", st.successes, st.failures, st.lastErr)
	}
}
