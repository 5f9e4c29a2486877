//go:build linux

// Package pty gives a restored process a terminal of its own on the
// destination, in place of the one it was attached to on the source
// (which stays there): a new pseudo-terminal pair, its slave handed to
// CRIU for the old terminal, its master drained by `phauld tty-drain`, a
// small process of its own that outlives phauld and writes what the
// process prints to the journal or nowhere, until the process closes its
// last descriptor on the terminal.
package pty

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Command is the first argument that makes phauld run as a drain (Main).
const Command = "tty-drain"

// Open opens a new pseudo-terminal pair: its master and its slave.
func Open() (master, slave *os.File, err error) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	fd := int(m.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		return nil, nil, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		m.Close()
		return nil, nil, fmt.Errorf("pty number: %w", err)
	}
	s, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	return m, s, nil
}

// StartDrain starts exe (phauld) as `exe tty-drain`, the master as its fd
// 3 and out (the journal stream, or /dev/null) as its stdout, in a
// session of its own: it outlives phauld, as the process does.
func StartDrain(exe string, master, out *os.File) error {
	cmd := exec.Command(exe, Command)
	cmd.ExtraFiles = []*os.File{master}
	cmd.Stdout = out
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	// Reaped by whoever adopts it once phauld is gone; meanwhile here.
	go cmd.Wait()
	return nil
}

// Main is `phauld tty-drain`: it copies fd 3 (a pty master) to stdout
// until the terminal's last slave is closed.
func Main(args []string) int {
	if len(args) != 0 {
		fmt.Fprintln(os.Stderr, "usage: phauld tty-drain (fd 3: a pty master)")
		return 2
	}
	master := os.NewFile(3, "pty")
	io.Copy(os.Stdout, master) // EIO once no slave is open: the end
	return 0
}
