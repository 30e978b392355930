package health

// keyedHeap is a binary min-heap ordered by an int64 key kept next to each
// element, so sifting reads and moves only the heap's own array. When
// place is set, each element is told its place after every move (so it can
// leave the heap in O(log n)); the scheduler's due heap does without (it
// drops removed entries lazily, when they come up) and so never touches an
// entry while sifting.
type keyedHeap[P any] struct {
	items []heapItem[P]
	place func(P, int) // nil: places are not tracked
}

type heapItem[P any] struct {
	key int64
	p   P
}

func (h *keyedHeap[P]) len() int { return len(h.items) }

// min returns the element with the smallest key; the heap must not be
// empty.
func (h *keyedHeap[P]) min() (P, int64) { return h.items[0].p, h.items[0].key }

func (h *keyedHeap[P]) push(p P, key int64) {
	h.items = append(h.items, heapItem[P]{key: key, p: p})
	i := len(h.items) - 1
	h.moved(i)
	h.up(i)
}

// pop removes and returns the element with the smallest key.
func (h *keyedHeap[P]) pop() P {
	p := h.items[0].p
	h.remove(0)
	return p
}

// remove takes out the element at place i (it is told its place is -1).
func (h *keyedHeap[P]) remove(i int) {
	last := len(h.items) - 1
	if h.place != nil {
		h.place(h.items[i].p, -1)
	}
	if i != last {
		h.items[i] = h.items[last]
		h.moved(i)
	}
	var zero heapItem[P]
	h.items[last] = zero // no stale pointer in the spare capacity
	h.items = h.items[:last]
	if i < last {
		h.down(i)
		h.up(i)
	}
}

// take empties the heap and returns what it held, in no order.
func (h *keyedHeap[P]) take() []heapItem[P] {
	out := h.items
	h.items = nil
	if h.place != nil {
		for _, it := range out {
			h.place(it.p, -1)
		}
	}
	return out
}

func (h *keyedHeap[P]) moved(i int) {
	if h.place != nil {
		h.place(h.items[i].p, i)
	}
}

func (h *keyedHeap[P]) swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	if h.place != nil {
		h.place(h.items[i].p, i)
		h.place(h.items[j].p, j)
	}
}

func (h *keyedHeap[P]) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if h.items[i].key >= h.items[parent].key {
			return
		}
		h.swap(i, parent)
		i = parent
	}
}

func (h *keyedHeap[P]) down(i int) {
	n := len(h.items)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		m := l
		if r := l + 1; r < n && h.items[r].key < h.items[l].key {
			m = r
		}
		if h.items[m].key >= h.items[i].key {
			return
		}
		h.swap(i, m)
		i = m
	}
}
