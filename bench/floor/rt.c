/* The FUSE round-trip floor of a machine: a minimal libfuse3 low-level server in C.
 *
 * The root directory is empty and LOOKUP answers "no such entry" without caching it, so
 * every stat(2) of a new name in the mount is exactly one LOOKUP round trip to this
 * process. Single-threaded, like Cistern's reading thread. Used by bench/fuse_floor.py.
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <string.h>
#include <sys/stat.h>

static void floor_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	(void)parent;
	(void)name;
	memset(&e, 0, sizeof(e)); /* ino 0, timeout 0: a negative entry the kernel forgets */
	fuse_reply_entry(req, &e);
}

static void floor_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	memset(&st, 0, sizeof(st));
	st.st_ino = ino;
	st.st_mode = S_IFDIR | 0755;
	st.st_nlink = 2;
	fuse_reply_attr(req, &st, 0.0);
}

static const struct fuse_lowlevel_ops floor_ops = {
	.lookup = floor_lookup,
	.getattr = floor_getattr,
};

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct fuse_cmdline_opts opts;
	struct fuse_session *se;
	int ret = 1;

	if (fuse_parse_cmdline(&args, &opts) != 0 || opts.mountpoint == NULL)
		return 1;
	se = fuse_session_new(&args, &floor_ops, sizeof(floor_ops), NULL);
	if (se == NULL)
		return 1;
	if (fuse_set_signal_handlers(se) == 0 && fuse_session_mount(se, opts.mountpoint) == 0) {
		ret = fuse_session_loop(se);
		fuse_session_unmount(se);
	}
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	return ret;
}
