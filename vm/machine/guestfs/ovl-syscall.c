// SPDX-License-Identifier: GPL-2.0
/*
 * ovl-syscall: run one syscall the scenarios care about and report its errno.
 *
 *   ovl-syscall mount SOURCE TARGET FSTYPE OPTIONS
 *   ovl-syscall umount TARGET
 *   ovl-syscall syncfs PATH
 *   ovl-syscall fsync PATH
 *   ovl-syscall sync_file_range PATH    (SYNC_FILE_RANGE_WRITE|WAIT_AFTER, whole file)
 *
 * Prints "ok" or "errno=<n> <name>: <strerror>" and exits 0 or 1, so the
 * host sees the exact errno of mount(2) rather than a mount(8) message.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

static int report(int ret)
{
	if (ret == 0) {
		puts("ok");
		return 0;
	}
	printf("errno=%d %s: %s\n", errno, strerrorname_np(errno), strerror(errno));
	return 1;
}

static int on_file(const char *path, int flags, int op)
{
	int fd = open(path, flags);
	int ret;

	if (fd < 0)
		return report(-1);
	switch (op) {
	case 's':
		ret = syncfs(fd);
		break;
	case 'f':
		ret = fsync(fd);
		break;
	default:
		ret = sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE |
				      SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
		break;
	}
	ret = report(ret);
	close(fd);
	return ret;
}

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "mount"))
		return report(mount(argv[2], argv[3], argv[4], 0, argv[5]));
	if (argc == 3 && !strcmp(argv[1], "umount"))
		return report(umount(argv[2]));
	if (argc == 3 && !strcmp(argv[1], "syncfs"))
		return on_file(argv[2], O_RDONLY, 's');
	if (argc == 3 && !strcmp(argv[1], "fsync"))
		return on_file(argv[2], O_WRONLY, 'f');
	if (argc == 3 && !strcmp(argv[1], "sync_file_range"))
		return on_file(argv[2], O_WRONLY, 'r');
	fprintf(stderr, "usage: ovl-syscall mount|umount|syncfs|fsync|sync_file_range ARGS\n");
	return 2;
}
