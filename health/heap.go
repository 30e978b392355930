package health

// placed is what a keyedHeap holds: a pointer that remembers its place in
// the heap, so it can leave the heap in O(log n).
type placed interface{ setHeapIndex(int) }

// keyedHeap is a binary min-heap ordered by an int64 key kept next to each
// element (comparisons read no element). The scheduler's due times and
// the connect poller's deadlines are both kept in one.
type keyedHeap[P placed] struct{ items []heapItem[P] }

type heapItem[P placed] struct {
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
	p.setHeapIndex(i)
	h.up(i)
}

// pop removes and returns the element with the smallest key.
func (h *keyedHeap[P]) pop() P {
	p := h.items[0].p
	h.remove(0)
	return p
}

// remove takes out the element at place i; it is told its place is -1.
func (h *keyedHeap[P]) remove(i int) {
	last := len(h.items) - 1
	h.items[i].p.setHeapIndex(-1)
	if i != last {
		h.items[i] = h.items[last]
		h.items[i].p.setHeapIndex(i)
	}
	var zero heapItem[P]
	h.items[last] = zero // no stale pointer in the spare capacity
	h.items = h.items[:last]
	if i < last {
		h.down(i)
		h.up(i)
	}
}

// clear empties the heap, telling every element.
func (h *keyedHeap[P]) clear() {
	for i := range h.items {
		h.items[i].p.setHeapIndex(-1)
		var zero heapItem[P]
		h.items[i] = zero
	}
	h.items = h.items[:0]
}

func (h *keyedHeap[P]) swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	h.items[i].p.setHeapIndex(i)
	h.items[j].p.setHeapIndex(j)
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
