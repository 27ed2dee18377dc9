#!/usr/bin/perl
# lsq.pl - query a Livestatus socket with Monitoring::Livestatus (Debian's
# libmonitoring-livestatus-perl) and print normalised answers, one per line,
# sorted, so that answers from different paths can be compared as text.
#
#   lsq.pl socket PATH KEEPALIVE queries|command
#   lsq.pl peer HOST:PORT KEEPALIVE queries|command
use strict;
use warnings;
use Monitoring::Livestatus;

my ($kind, $where, $keepalive, $what) = @ARGV;
die "usage: $0 socket|peer WHERE 0|1 queries|command\n" unless defined $what;
my $ml = Monitoring::Livestatus->new(
    $kind => $where,
    keepalive => $keepalive,
    timeout => 30,
    errors_are_fatal => 0,
    warnings => 0,
);

sub cell { my $v = shift; return ref $v eq 'ARRAY' ? join(',', sort map { cell($_) } @$v) : defined $v ? $v : '' }

my @out;
if ($what eq 'queries') {
    my %lists = (
        hosts    => "GET hosts\nColumns: name state address groups",
        down     => "GET hosts\nColumns: name\nFilter: state = 1",
        services => "GET services\nColumns: host_name description state plugin_output",
        stats    => "GET services\nStats: state = 0\nStats: state = 1\nStats: state = 2\nStats: state = 3",
        grouped  => "GET services\nColumns: description\nStats: state != 0",
        groups   => "GET hostgroups\nColumns: name num_hosts members",
    );
    for my $id (sort keys %lists) {
        my $rows = $ml->selectall_arrayref($lists{$id});
        die "$id failed: $Monitoring::Livestatus::ErrorCode $Monitoring::Livestatus::ErrorMessage\n" unless $rows;
        push @out, map { "$id\t" . join('|', map { cell($_) } @$_) } @$rows;
    }
    my $hashes = $ml->selectall_arrayref("GET hosts\nColumns: name state\nFilter: state = 1", { Slice => {} });
    push @out, map { my $h = $_; "slice\t" . join(';', map { "$_=$h->{$_}" } sort keys %$h) } @$hashes;
    push @out, "scalar\t" . $ml->selectscalar_value("GET hosts\nStats: state = 0");
    my $row = $ml->selectrow_arrayref("GET status\nColumns: num_hosts num_services");
    push @out, "row\t" . join('|', @$row);
    my $bad = $ml->selectall_arrayref("GET nosuchtable");
    push @out, "error\tnosuchtable\t" . (defined $bad ? 'no error' : $Monitoring::Livestatus::ErrorCode);
} elsif ($what eq 'command') {
    my $marker = "lsq-perl-" . time() . "-$$";
    $ml->do("COMMAND [" . time() . "] ADD_HOST_COMMENT;host-0007;1;perl;$marker");
    my $seen = 0;
    for (1 .. 100) {
        my $n = $ml->selectscalar_value("GET comments\nStats: comment = $marker");
        if (defined $n && $n == 1) { $seen = 1; last }
        select(undef, undef, undef, 0.05);
    }
    push @out, "command\t" . ($seen ? 'visible' : 'not visible');
}
print "$_\n" for sort @out;
