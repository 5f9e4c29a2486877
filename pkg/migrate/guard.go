//go:build linux

package migrate

// Guard is a restored copy's dead man's switch, outside this daemon's
// process (pkg/guard): from the restore until the commit, a copy must not
// outlive the daemon that holds it. In lazy mode it runs before the commit,
// on memory the lazy-pages daemon (which dies with phauld) brings in; were
// phauld to die, the source resumes its own copy, and the destination's
// would run on with zeros where its pages never came. When its daemon
// dies, the guard kills the copy unless the session's record says
// committed.
type Guard interface {
	// Fd becomes readable when the guard has ended.
	Fd() int
	// Release tells the guard the copy is committed: it leaves it be,
	// and ends.
	Release()
	// Close ends the guard as the daemon's death would: it kills the
	// copy unless the record says committed.
	Close()
}
