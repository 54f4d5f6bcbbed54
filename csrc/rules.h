// The rules the native kernels know, one line each: X(name, functor). The name is the rule's
// Python name (Rule.name), on which the ops dispatch.
#pragma once

#include "rule_fromage.h"

#define FF_RULES(X) X("fromage", FromageRule)
