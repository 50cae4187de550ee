fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`millrace runs | head`) instead of panicking on a broken pipe.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(millrace::cli::main());
}
