/* Load generator for the monitor benchmark: open()+close() a file at a paced rate.
 * usage: opengen PATH RATE SECONDS   (RATE 0 = as fast as possible)
 * Prints the number of opens done and the achieved rate. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s PATH RATE SECONDS\n", argv[0]);
		return 2;
	}
	const char *path = argv[1];
	double rate = atof(argv[2]), secs = atof(argv[3]);
	const int burst = 64;
	long n = 0;
	double start = now(), end = start + secs;
	while (now() < end) {
		for (int i = 0; i < burst; i++) {
			int fd = open(path, O_RDONLY);
			if (fd >= 0)
				close(fd);
			n++;
		}
		if (rate > 0) {
			double due = start + n / rate, t = now();
			if (due > t)
				usleep((useconds_t)((due - t) * 1e6));
		}
	}
	double el = now() - start;
	printf("%ld %.1f\n", n, n / el);
	return 0;
}
